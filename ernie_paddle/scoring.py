"""How outputs are compared and scored, in one place (numpy only): greedy agreement, perplexity, KL divergence.

Two greedy figures exist and mean different things: `shared_prefix` counts the tokens two greedy continuations
share before their first difference (parity's "greedy same", quant_quality's agreement); an *identical*
continuation is one whose shared prefix is its whole length (verification's count of identical prompts).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from ernie_paddle.errors import InputError


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common (the length of the identical greedy continuation)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (stable: the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)); clipped at 0 (it is >= 0 up to rounding)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return max(0.0, float((np.exp(lp) * (lp - lq)).sum(-1).mean()))


def windows(ids: np.ndarray, seq: int, batch: int) -> Iterator[np.ndarray]:
    """Non-overlapping windows of `seq` + 1 tokens, up to `batch` rows at a time: inputs are `[:, :-1]`, targets
    `[:, 1:]` (consecutive windows share one token, so every token but the first is predicted once)."""
    n = (len(ids) - 1) // seq
    if n < 1:
        raise InputError(f"perplexity needs more than {seq} tokens of text, got {len(ids)}")
    for i in range(0, n, batch):
        yield np.stack([ids[j * seq:(j + 1) * seq + 1] for j in range(i, min(n, i + batch))])


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, seq: int = 128,
               batch: int = 8) -> float:
    """Per-token perplexity of `ids` over non-overlapping windows of `seq` tokens; `logits_fn(ids [B, T])` gives
    logits [B, T, V]."""
    nll, count = 0.0, 0
    for rows in windows(ids, seq, batch):
        logp = log_softmax(logits_fn(rows[:, :-1]))
        nll -= float(np.take_along_axis(logp, rows[:, 1:, None], axis=-1).sum())
        count += rows[:, 1:].size
    return float(np.exp(nll / count))

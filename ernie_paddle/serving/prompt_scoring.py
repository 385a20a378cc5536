"""The engine's side of prompt scoring (`echo` with `logprobs`): each prompt token's log-probability given the tokens
before it, read from every position's logits of the request's own prefill.

A scored request (`Request.score_prompt`) takes nothing from the prefix cache, so every prompt position is computed
by the model in its prefill slices, and each slice asks for the logits of all its positions instead of the last
only. Position i's logits score prompt token i + 1; the last prompt position's logits choose the first generated
token as for any request. This costs no second pass over the prompt: the scores come from the prefill that fills
the request's KV rows anyway (and what it computes is still offered to the prefix cache for later requests).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ernie_paddle.scoring import log_softmax

Score = tuple[float, list[tuple[int, float]]]  # (the token's log-probability, the k most likely (id, logprob))


def score_slice(prompt: Sequence[int], start: int, logits: np.ndarray, k: int) -> list[Score]:
    """Scores of the prompt tokens that positions start..start+len(logits)-1 predict (logits [T, V]); the last
    prompt position predicts no prompt token and adds nothing."""
    out = []
    for i, row in enumerate(logits):
        target = start + i + 1
        if target >= len(prompt):
            break
        logp = log_softmax(row)  # one row at a time: a slice of a large vocabulary stays a few rows in float64
        top = np.argpartition(-logp, k - 1)[:k] if k else np.zeros(0, np.int64)
        top = top[np.lexsort((top, -logp[top]))]  # most likely first; ties by id
        token = int(prompt[target])
        out.append((float(logp[token]), [(int(j), float(logp[j])) for j in top]))
    return out

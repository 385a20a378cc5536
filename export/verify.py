"""Parity of an exported folder against the Paddle model: logits, prefill-then-decode, greedy tokens."""

from __future__ import annotations

import numpy as np

from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.scoring import shared_prefix

FP32_LOGIT_TOL = 1e-4


def verification_prompts(vocab_size: int, seed: int = 1234) -> list[list[int]]:
    """A few fixed prompts of different lengths (ids avoid 0-2: pad, bos, eos)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in (5, 11, 17)]


def compare(reference, candidate, prompts: list[list[int]], greedy_tokens: int = 16) -> dict:
    """Figures for `candidate` (an OnnxCausalLM) against `reference` (the Paddle model) on `prompts`."""
    max_diff, top1_same, top1_total, decode_diff = 0.0, 0, 0, 0.0
    identical, same_prefix = 0, []
    gen = GenerationConfig(max_new_tokens=greedy_tokens, eos_token_ids=[])
    for p in prompts:
        ref = reference.logits(p)
        got = candidate.logits(p)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        top1_same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        top1_total += len(p)
        # prefill half the prompt, then decode the rest one token at a time through the KV cache
        half = len(p) // 2
        cache = candidate.allocate_cache(1, len(p))
        steps = [candidate(np.array([p[:half]]), cache=cache).logits[0]]
        for t in p[half:-1]:
            steps.append(candidate(np.array([[t]]), cache=cache).logits[0])
        decode_diff = max(decode_diff, float(np.abs(np.concatenate(steps) - ref[:-1]).max()))
        a, b = generate(reference, p, gen), generate(candidate, p, gen)
        same_prefix.append(shared_prefix(a, b))
        identical += int(a == b)
    return {"prompts": len(prompts), "max_abs_logit_diff": max_diff, "decode_max_abs_logit_diff": decode_diff,
            "top1_agreement": top1_same / top1_total, "greedy_tokens": greedy_tokens,
            "greedy_identical_prompts": identical, "greedy_identical_prefix": same_prefix}

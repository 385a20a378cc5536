"""KV-cache slots for continuous batching: each running request owns one row of a preallocated cache.

`SharedSlots` (the ort flavour): one [slots, kv_heads, max_len, head_dim] buffer per layer, which
GroupQueryAttention updates in place. Row i holds one sequence in its slots 0..length-1 (onnxruntime-genai's
per-row lengths), so requests of different lengths decode in one call over rows 0..n-1, and a new prompt is
prefilled alone into its own row, in chunks. Nothing is copied per step: a row's filled part is copied only when
a request leaves and another row moves into its place.

`SeparateSlots` (any other model: Paddle, the portable graph): a batch-1 cache per request, decoded one row at a
time. The same interface, without the batching.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ernie_paddle.causal_lm import KV, Cache, CausalLM
from ernie_paddle.generation import logits_numpy


class Slots(Protocol):
    """What the engine needs of a model's cache: rows it prefills, decodes together, moves and frees."""

    capacity: int
    max_len: int

    def prefill(self, slot: int, ids: np.ndarray, start: int, every: bool = False) -> np.ndarray:
        """Run prompt tokens `ids` (1-D) at positions start.. of row `slot`; float32 logits [V] of the last
        (`every`: [T, V] of every position, for prompt scoring)."""

    def decode(self, start: int, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token per row start..start+n-1, whose sequences hold `lengths` tokens; float32 logits [n, V]."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` cached tokens become row `dst`'s."""

    def release(self, slot: int) -> None:
        """Row `slot` is free."""

    def read(self, slot: int, start: int, end: int) -> KV:
        """A copy of row `slot`'s keys and values at slots start..end-1 (the prefix cache keeps it)."""

    def write(self, slot: int, start: int, kv: KV) -> None:
        """Row `slot` gets `kv` at slots start.. (a prefix found in the prefix cache); its prefill goes on after it."""


class SharedSlots:
    """Rows of one preallocated in-place cache (the ort flavour's GroupQueryAttention), which the model allocates."""

    def __init__(self, model: CausalLM, capacity: int, max_len: int):
        self.model, self.capacity, self.max_len = model, capacity, max_len
        self.rows = model.allocate_rows(capacity, max_len)

    def _cache(self, start: int, n: int, length: int) -> Cache:
        return self.rows.view(start, n, length)

    def prefill(self, slot: int, ids: np.ndarray, start: int, every: bool = False) -> np.ndarray:
        end = start + len(ids)
        out = self.model(ids[None], attention_mask=np.ones((1, end), np.int64), cache=self._cache(slot, 1, start),
                         last_only=not every)
        return out.logits[0] if every else out.logits[0, -1]

    def decode(self, start: int, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        n, total = len(tokens), int(lengths.max()) + 1
        mask = (np.arange(total)[None, :] < lengths[:, None]).astype(np.int64)
        mask[:, -1] = 1  # the new token; a row's length is its mask's sum
        out = self.model(np.asarray(tokens, np.int64)[:, None], attention_mask=mask,
                         cache=self._cache(start, n, total - 1), last_only=True)
        return out.logits[:, -1]

    def move(self, src: int, dst: int, length: int) -> None:
        self.rows.move(src, dst, length)

    def release(self, slot: int) -> None:
        pass  # the row is overwritten by its next prompt

    def read(self, slot: int, start: int, end: int) -> KV:
        return self.model.read_kv(self._cache(slot, 1, start), 0, start, end)

    def write(self, slot: int, start: int, kv: KV) -> None:
        self.model.write_kv(self._cache(slot, 1, start), 0, start, kv)


class SeparateSlots:
    """A batch-1 cache per request for models without an in-place cache; rows decode one at a time."""

    def __init__(self, model: CausalLM, capacity: int, max_len: int):
        self.model, self.capacity, self.max_len = model, capacity, max_len
        self.caches: list = [None] * capacity

    def _run(self, slot: int, ids: np.ndarray, start: int, every: bool = False) -> np.ndarray:
        end = start + ids.shape[1]
        out = self.model(ids, attention_mask=np.ones((1, end), np.int64),
                         position_ids=np.arange(start, end, dtype=np.int64)[None], cache=self.caches[slot],
                         last_only=not every)
        return logits_numpy(out)[0] if every else logits_numpy(out)[0, -1]

    def prefill(self, slot: int, ids: np.ndarray, start: int, every: bool = False) -> np.ndarray:
        if start == 0:
            self.caches[slot] = self.model.allocate_cache(1, self.max_len)
        return self._run(slot, np.asarray(ids, np.int64)[None], start, every)

    def decode(self, start: int, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return np.stack([self._run(start + i, np.array([[t]], np.int64), int(n))
                         for i, (t, n) in enumerate(zip(tokens, lengths))]).astype(np.float32, copy=False)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None

    def release(self, slot: int) -> None:
        self.caches[slot] = None

    def read(self, slot: int, start: int, end: int) -> KV:
        return self.model.read_kv(self.caches[slot], 0, start, end)

    def write(self, slot: int, start: int, kv: KV) -> None:
        if start == 0:
            self.caches[slot] = self.model.allocate_cache(1, self.max_len)
        self.model.write_kv(self.caches[slot], 0, start, kv)


def slots_for(model: CausalLM, capacity: int, max_len: int) -> Slots:
    """Shared rows when the model updates its cache in place (the ort flavour), else a cache per request."""
    kind = SharedSlots if model.shares_kv_buffer else SeparateSlots
    return kind(model, capacity, max_len)

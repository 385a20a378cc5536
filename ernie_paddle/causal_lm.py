"""The model interface that generation, the serving engine and its slots drive: the Paddle model
(`paddle.modeling.Ernie4_5_MoeForCausalLM`, and a rank of the distributed one) and the ONNX Runtime model
(`ort.runtime.OnnxCausalLM`) both provide it, so one decode loop runs either."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ernie_paddle.config import ErnieConfig


class Cache(Protocol):
    """A preallocated KV cache: `length` of its `max_len` slots are filled; a model call advances it."""

    length: int
    max_len: int


KV = list[tuple[np.ndarray, np.ndarray]]
"""Keys and values of some cached tokens, per layer: two [kv_heads, tokens, head_dim] arrays in the cache's dtype
(what the prefix cache keeps and a prompt-cache file holds)."""


class Output(Protocol):
    """A model call's result: float32 logits [B, T, V] (a Paddle Tensor or a numpy array)."""

    logits: Any


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM over a KV cache.

    - `chunked_prefill_max_batch`: the largest batch that may prefill several tokens over a filled cache (None:
      any); a larger batch prefills its prompt in one pass.
    - `has_position_ids`: the model takes explicit positions; otherwise it derives them from the attention mask.
    - `shares_kv_buffer`: the model updates one cache buffer in place, so requests can share a buffer's rows
      (`allocate_rows`); otherwise each sequence has a cache of its own.
    - `identity`: what a saved KV state must match to be reused: "model" (the weights), "export" (the graph or the
      Paddle compute path) and "kv_dtype".
    """

    config: ErnieConfig
    chunked_prefill_max_batch: int | None
    has_position_ids: bool
    shares_kv_buffer: bool
    identity: dict[str, str]

    def check_ids(self, ids: np.ndarray) -> None:
        """Raise InputError unless every id indexes the embedding."""

    def allocate_cache(self, batch: int, max_len: int) -> Cache:
        """An empty cache for `batch` sequences of up to `max_len` tokens."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 position_ids: np.ndarray | None = None, cache: Cache | None = None,
                 last_only: bool = False) -> Output:
        """Run input_ids [B, T] after the cache's tokens; `last_only`: logits of the last position only."""

    def read_kv(self, cache: Cache, row: int, start: int, end: int) -> KV:
        """A copy of sequence `row`'s cached keys and values at slots start..end-1."""

    def write_kv(self, cache: Cache, row: int, start: int, kv: KV) -> None:
        """Put `kv` at slots start.. of sequence `row` (what `read_kv` gave); a batch-1 cache then holds start + n
        tokens."""


class RowCache(Protocol):
    """Rows of one in-place cache, one sequence a row (a `shares_kv_buffer` model's `allocate_rows`)."""

    def view(self, start: int, n: int, length: int) -> Cache:
        """The cache of rows start..start+n-1, whose sequences hold `length` tokens."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src`'s first `length` cached tokens become row `dst`'s."""

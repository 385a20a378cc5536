"""Weights in and out of a Paddle model: fill its parameters from canonical tensors, save it as a checkpoint.

The Paddle-needing half of checkpoint I/O (`checkpoint.folder` is numpy only).
"""

from __future__ import annotations


from typing import Iterable

import numpy as np
import paddle

from ernie_paddle.checkpoint.folder import read_canonical, write_checkpoint
from ernie_paddle.errors import CheckpointError
from ernie_paddle.checkpoint.layout import PADDLE, TensorMap, tensor_maps
from ernie_paddle.checkpoint.safetensors_io import MAX_SHARD_BYTES


def fill_parameters(model: paddle.nn.Layer, pairs: Iterable[tuple[TensorMap, np.ndarray]], directory: str,
                    what: str = "the model", part: paddle.nn.Layer | None = None) -> None:
    """Copy canonical (map, array) pairs into `model`'s parameters (cast to their dtype); every parameter must get
    exactly its shape, and none may be left without a tensor. `what` names the receiver in errors; `part`: fill
    only that sublayer's parameters (one decoder layer, streamed in), still under their names in `model`."""
    params = dict(model.named_parameters())
    if part is not None:
        own = {id(p) for p in part.parameters()}
        params = {name: p for name, p in params.items() if id(p) in own}
    loaded = set()
    for m, array in pairs:
        p = params.get(m.canonical)
        if p is None:
            raise CheckpointError(f"{directory}: the model has no parameter for '{m.canonical}'")
        if tuple(p.shape) != array.shape:
            raise CheckpointError(f"{directory}: '{m.canonical}' has shape {list(array.shape)}, {what} "
                                  f"expects {list(p.shape)}")
        t = paddle.to_tensor(array)
        p.set_value(t if t.dtype == p.dtype else t.astype(p.dtype))
        loaded.add(m.canonical)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{directory}: no checkpoint tensor for model parameter(s) {', '.join(missing[:8])}")


def load_weights(model, directory: str, allow_pickle: bool = False) -> None:
    """Copy the checkpoint's tensors into a `Ernie4_5_MoeForCausalLM`'s parameters (cast to their dtype)."""
    fill_parameters(model, read_canonical(directory, model.config, allow_pickle), directory)


def save_pretrained(model, out_dir: str, *, layout: str = PADDLE, dtype: str = "float32",
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write a Paddle model's weights as a `-Paddle` or `-PT` checkpoint directory (sharded when large)."""
    params = dict(model.named_parameters())

    def tensors():
        for m in tensor_maps(model.config, layout):
            p = params[m.canonical]
            yield m.canonical, (p if p.dtype == paddle.float32 else p.astype("float32")).numpy()

    return write_checkpoint(model.config, tensors(), out_dir, layout=layout, dtype=dtype,
                            max_shard_bytes=max_shard_bytes, overwrite=True)  # as transformers' save_pretrained


__all__ = ["fill_parameters", "load_weights", "save_pretrained"]

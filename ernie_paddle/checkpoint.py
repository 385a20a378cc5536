"""Checkpoint directories: load into the Paddle model, save in either layout, convert, make random ones.

All of it streams canonical tensors (see `layout.py`) one at a time, so memory stays bounded by one
tensor when reading and by one shard when writing. Only numpy here, except `load_weights`, which takes a
Paddle model (it imports nothing from Paddle itself).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable, Iterator

import numpy as np

from .config import ErnieConfig
from .errors import CheckpointError
from .layout import LAYOUTS, PADDLE, PT, Role, TensorMap, iter_canonical, tensor_maps
from .safetensors_io import ShardedWriter, open_checkpoint

DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Files besides the weights that travel with a checkpoint when it is converted.
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "added_tokens.json")

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


class TensorStream:
    """Canonical tensors from an iterator, taken by name in (nearly) the order they arrive."""

    def __init__(self, pairs: Iterator[tuple[str, np.ndarray]]):
        self._it = iter(pairs)
        self._held: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray:
        while name not in self._held:
            try:
                k, v = next(self._it)
            except StopIteration:
                raise KeyError(f"checkpoint has no tensor '{name}'") from None
            self._held[k] = v
        return self._held.pop(name)


def read_canonical(directory: str, cfg: ErnieConfig | None = None, allow_pickle: bool = False
                   ) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """Canonical tensors of the checkpoint in `directory` (either layout), strictly checked, one at a time.

    Pickled `.pdparams` are read only with `allow_pickle=True` (unpickling can run code)."""
    cfg = cfg or ErnieConfig.from_file(directory)
    reader = open_checkpoint(directory, allow_pickle)
    try:
        yield from iter_canonical(cfg, reader)
    finally:
        reader.close()


def load_weights(model, directory: str, allow_pickle: bool = False) -> None:
    """Copy the checkpoint's tensors into a `Ernie4_5_MoeForCausalLM`'s parameters (cast to their dtype)."""
    fill_parameters(model, read_canonical(directory, model.config, allow_pickle), directory)


def fill_parameters(model, pairs, directory: str, what: str = "the model") -> None:
    """Copy canonical (map, array) pairs into `model`'s parameters (cast to their dtype); every parameter must get
    exactly its shape, and none may be left without a tensor. `what` names the receiver in errors."""
    import paddle

    params = dict(model.named_parameters())
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


def write_checkpoint(cfg: ErnieConfig, tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, *,
                     layout: str = PADDLE, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 1024**3,
                     side_files_from: str | None = None, progress: Progress | None = None,
                     overwrite: bool = False) -> list[str]:
    """Write canonical (name, array) pairs, in `tensor_maps` order, as a checkpoint directory.

    Atomic: files are staged in a temporary directory and renamed to `out_dir` only when complete; an
    existing `out_dir` is an error unless `overwrite`.
    Router weights and the correction bias stay float32 whatever `dtype` is (as in the released weights).
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    maps = {m.canonical: m for m in tensor_maps(cfg, layout)}
    writer = ShardedWriter(out_dir, max_shard_bytes, metadata={"format": "pt" if layout != PADDLE else "paddle"},
                           overwrite=overwrite)
    try:
        done = 0
        for name, array in tensors:
            m = maps.pop(name)
            if tuple(array.shape) != m.shape:
                raise CheckpointError(f"tensor '{name}' has shape {list(array.shape)}, expected {list(m.shape)}")
            st_dtype = "F32" if m.keep_fp32 else DTYPES[dtype]
            for (disk_name, disk_shape), part in zip(m.parts, m.split(array)):
                writer.add(disk_name, np.ascontiguousarray(part), st_dtype)
            done += 1
            if progress:
                progress(done, done + len(maps), name)
        if maps:
            raise CheckpointError(f"no data for tensor(s) {', '.join(list(maps)[:8])}")
        cfg.save(writer.staging_dir, layout, dtype)
        if side_files_from:
            for f in SIDE_FILES:
                src = os.path.join(side_files_from, f)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(writer.staging_dir, f))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def save_pretrained(model, out_dir: str, *, layout: str = PADDLE, dtype: str = "float32",
                    max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write a Paddle model's weights as a `-Paddle` or `-PT` checkpoint directory (sharded when large)."""
    import paddle

    params = dict(model.named_parameters())

    def tensors():
        for m in tensor_maps(model.config, layout):
            p = params[m.canonical]
            yield m.canonical, (p if p.dtype == paddle.float32 else p.astype("float32")).numpy()

    return write_checkpoint(model.config, tensors(), out_dir, layout=layout, dtype=dtype,
                            max_shard_bytes=max_shard_bytes, overwrite=True)  # as transformers' save_pretrained


def convert(src: str, out_dir: str, *, layout: str, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 1024**3,
            strict_config: bool = False, progress: Progress | None = None, allow_pickle: bool = False) -> list[str]:
    """Convert a checkpoint between layouts (and dtypes), streaming; tokenizer files are copied along."""
    cfg = ErnieConfig.from_file(src, strict=strict_config)
    pairs = ((m.canonical, a) for m, a in read_canonical(src, cfg, allow_pickle))
    return write_checkpoint(cfg, pairs, out_dir, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            side_files_from=src, progress=progress)


def random_tensors(cfg: ErnieConfig, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Random canonical tensors with realistic scales (peaked logits, varied routing), one at a time.

    Linear weights ~ N(0, 1/fan_in); norms near 1; embeddings N(0, 0.3²); correction bias ~ U(-0.05, 0.05)
    so that it changes some expert choices (and a port that adds it to the weights is caught).
    """
    rng = np.random.default_rng(seed)
    for m in tensor_maps(cfg, PT):
        shape = m.shape
        if m.role.is_norm:
            a = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif m.role is Role.EMBEDDING:  # small next to layer outputs, so a tied head does not just copy
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.3)
        elif m.role is Role.ROUTER_BIAS:
            a = rng.uniform(-0.05, 0.05, shape).astype(np.float32)
        elif m.role is Role.ROUTER:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(2.0 / np.sqrt(shape[0]))
        else:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[0]))
        yield m.canonical, a


def make_checkpoint(cfg: ErnieConfig, out_dir: str, *, layout: str = PADDLE, dtype: str = "bfloat16",
                    seed: int = 0, max_shard_bytes: int = 5 * 1024**3, progress: Progress | None = None) -> list[str]:
    """A random checkpoint of `cfg` in the real on-disk format, written shard by shard in bounded memory."""
    return write_checkpoint(cfg, random_tensors(cfg, seed), out_dir, layout=layout, dtype=dtype,
                            max_shard_bytes=max_shard_bytes, progress=progress)


__all__ = ["read_canonical", "load_weights", "write_checkpoint", "save_pretrained", "convert", "random_tensors",
           "make_checkpoint", "PADDLE", "PT"]

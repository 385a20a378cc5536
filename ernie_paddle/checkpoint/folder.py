"""Checkpoint directories: read and write them in either layout, convert, make random ones.

All of it streams canonical tensors (see `layout.py`) one at a time, so memory stays bounded by one tensor when
reading and by one shard when writing. Numpy only, so the exporter and the ONNX side never import Paddle through
it: moving weights in and out of a Paddle model is `paddle.weights`, unpickling `.pdparams` is `paddle.pdparams`
(imported only when the user allows pickles).
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from ernie_paddle.atomic import atomic_dir
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import CheckpointError
from ernie_paddle.files import INDEX_FILE, SIDE_FILES, SINGLE_FILE, pickled_files
from ernie_paddle.checkpoint.layout import LAYOUTS, PADDLE, PT, Role, TensorMap, iter_canonical, tensor_maps
from ernie_paddle.precisions import DTYPES
from ernie_paddle.checkpoint.safetensors_io import MAX_SHARD_BYTES, CheckpointReader, ShardedWriter

if TYPE_CHECKING:
    from ernie_paddle.paddle.pdparams import PickleReader

# The safetensors dtype each Paddle dtype of `precisions.DTYPES` (float32, bfloat16, float16) is written in.
ST_DTYPES = dict(zip(DTYPES, ("F32", "BF16", "F16")))

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


def open_checkpoint(directory: str, allow_pickle: bool = False) -> CheckpointReader | PickleReader:
    """A reader for `directory`: safetensors (always), or `.pdparams` pickles when `allow_pickle` and there are no
    safetensors (only then is Paddle imported)."""
    if allow_pickle and os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, SINGLE_FILE)) \
            and not os.path.isfile(os.path.join(directory, INDEX_FILE)) and pickled_files(directory):
        from ernie_paddle.paddle.pdparams import PickleReader

        return PickleReader(directory)
    return CheckpointReader(directory)


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


def write_checkpoint(cfg: ErnieConfig, tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, *,
                     layout: str = PADDLE, dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES,
                     side_files_from: str | None = None, progress: Progress | None = None,
                     overwrite: bool = False) -> list[str]:
    """Write canonical (name, array) pairs, in `tensor_maps` order, as a checkpoint directory.

    Atomic: files are staged in a temporary directory and renamed to `out_dir` only when complete; an
    existing `out_dir` is an error unless `overwrite`.
    Router weights and the correction bias stay float32 whatever `dtype` is (as in the released weights).
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if dtype not in ST_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {', '.join(ST_DTYPES)}")
    maps = {m.canonical: m for m in tensor_maps(cfg, layout)}
    with atomic_dir(out_dir, overwrite=overwrite, error=CheckpointError, noun="directory") as staging:
        writer = ShardedWriter(staging, max_shard_bytes, metadata={"format": "pt" if layout != PADDLE else "paddle"})
        done = 0
        for name, array in tensors:
            m = maps.pop(name)
            if tuple(array.shape) != m.shape:
                raise CheckpointError(f"tensor '{name}' has shape {list(array.shape)}, expected {list(m.shape)}")
            st_dtype = "F32" if m.keep_fp32 else ST_DTYPES[dtype]
            for (disk_name, disk_shape), part in zip(m.parts, m.split(array)):
                writer.add(disk_name, np.ascontiguousarray(part), st_dtype)
            done += 1
            if progress:
                progress(done, done + len(maps), name)
        if maps:
            raise CheckpointError(f"no data for tensor(s) {', '.join(list(maps)[:8])}")
        cfg.save(staging, layout, dtype)
        if side_files_from:
            copy_side_files(side_files_from, staging)
        return writer.finish()


def copy_side_files(src: str, dst: str) -> None:
    """Copy the tokenizer and generation files (`files.SIDE_FILES`) that folder `src` has into folder `dst`."""
    for f in SIDE_FILES:
        path = os.path.join(src, f)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, f))


def convert(src: str, out_dir: str, *, layout: str, dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES,
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
                    seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES, progress: Progress | None = None
                    ) -> list[str]:
    """A random checkpoint of `cfg` in the real on-disk format, written shard by shard in bounded memory."""
    return write_checkpoint(cfg, random_tensors(cfg, seed), out_dir, layout=layout, dtype=dtype,
                            max_shard_bytes=max_shard_bytes, progress=progress)


__all__ = ["open_checkpoint", "read_canonical", "write_checkpoint", "copy_side_files", "convert", "random_tensors",
           "make_checkpoint", "PADDLE", "PT"]

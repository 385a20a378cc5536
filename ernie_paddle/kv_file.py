"""Saved KV states in safetensors files: `generate --prompt-cache FILE` (one prompt's keys and values) and the
server's `--prefix-cache-dir` (the prefix cache's blocks). Nothing is unpickled.

A file holds `token_ids`, then `layers.{i}.key` / `layers.{i}.value` per layer, and in its metadata the format,
its kind and the identity of the model that computed it (`CausalLM.identity`: model, export, kv_dtype). A file of
another model, export or cache dtype is refused naming what differs; so is one truncated or corrupt. Writes are
atomic: a reader never sees half a file.
"""

from __future__ import annotations

import numpy as np

from ernie_paddle.atomic import atomic_path
from ernie_paddle.causal_lm import KV
from ernie_paddle.checkpoint.safetensors_io import SafetensorsFile, write_arrays
from ernie_paddle.errors import CheckpointError, KVFileError

FORMAT = "ernie-paddle-kv/1"
PROMPT = "prompt"  # token_ids [T]; layers.{i}.key [kv_heads, T, head_dim]
BLOCKS = "prefix-blocks"  # token_ids [N, block]; parents [N] (-1: a first block); layers.{i}.key [N, kv_heads, block, d]
IDENTITY = ("model", "export", "kv_dtype")
TOKENS, PARENTS = "token_ids", "parents"


def key_name(layer: int, kv: str) -> str:
    return f"layers.{layer}.{kv}"


def write(path: str, kind: str, identity: dict[str, str], tokens: np.ndarray, layers: list[tuple[np.ndarray, ...]],
          extra: dict[str, np.ndarray] | None = None) -> None:
    """Write tokens and per-layer (key, value) arrays of `kind`, stamped with `identity`, atomically."""
    arrays = {TOKENS: np.asarray(tokens, np.int64), **(extra or {})}
    for i, (k, v) in enumerate(layers):
        arrays[key_name(i, "key")], arrays[key_name(i, "value")] = k, v
    meta = {"format": FORMAT, "kind": kind, "layers": str(len(layers)), **{f: identity[f] for f in IDENTITY}}
    with atomic_path(path) as tmp:
        write_arrays(tmp, arrays, meta)


def read(path: str, kind: str, identity: dict[str, str]) -> tuple[np.ndarray, KV, SafetensorsFile]:
    """The tokens and layers of a file of `kind` computed by the model of `identity`; KVFileError otherwise."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        raise KVFileError(str(e)) from None
    meta = f.metadata
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise KVFileError(f"{path}: not a {kind} KV file of ernie-paddle (format {meta.get('format')!r}, kind "
                          f"{meta.get('kind')!r}; expected {FORMAT!r}, {kind!r})")
    for field in IDENTITY[::-1]:  # the most telling first: a cache dtype, an engine, then the model's digest
        if meta.get(field) != identity[field]:
            raise KVFileError(f"{path}: saved by another {field.replace('_', ' ')}: {meta.get(field)!r}, this one "
                              f"is {identity[field]!r}")
    try:
        n = int(meta.get("layers", ""))
        tokens = f.get(TOKENS)
        layers = [(f.get(key_name(i, "key")), f.get(key_name(i, "value"))) for i in range(n)]
    except (CheckpointError, ValueError) as e:
        raise KVFileError(f"{path}: {e}" if not str(e).startswith(path) else str(e)) from None
    want = np.dtype("float32" if identity["kv_dtype"] == "bfloat16" else identity["kv_dtype"])  # (numpy has no bf16)
    count, axis = (tokens.shape[0], 1) if kind == PROMPT else (tokens.shape[0] if tokens.ndim else 0, 0)
    for i, kv in enumerate(layers):
        for name, a in zip(("key", "value"), kv):
            if a.dtype != want or a.ndim < 3 or a.shape[axis] != count or a.shape != kv[0].shape:
                raise KVFileError(f"{path}: tensor '{key_name(i, name)}' is {a.dtype} {list(a.shape)}, which does "
                                  f"not hold {count} {'tokens' if kind == PROMPT else 'blocks'} of {want}")
    if tokens.dtype != np.int64:
        raise KVFileError(f"{path}: tensor '{TOKENS}' is {tokens.dtype}, expected int64")
    return tokens, layers, f

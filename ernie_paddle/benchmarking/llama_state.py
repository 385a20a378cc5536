"""Read, tile and write llama.cpp's per-sequence KV-cache state, to fill a context with N cells without computing them.

A decode step's cost in llama.cpp depends on how many cache cells are occupied, not on their values, so a long
context can be measured without its hour-long prefill: take the state of a short real prefill and load it back with
its cells repeated to any count (positions 0..n-1). Format of `llama_state_seq_get_data` in the llama.cpp vendored by
llama-cpp-python 0.3.36 (src/llama-context.cpp `state_seq_*`, src/llama-kv-cache.cpp `state_write_meta/_data`),
little-endian, one plain KV cache (no SWA or recurrent memory):

    u32 io_magic 0xaf143cd8, i32 seq_id, u32 n_stream (1)
    u32 cell_count; per cell: i32 pos, u32 n_seq_id (1), i32 seq_id
    u32 v_trans, u32 n_layer
    per layer K: i32 ggml type, u64 row bytes, cell_count rows
    per layer V: as K when v_trans is 0; else i32 type, u32 element bytes, u32 n_embd_v, then n_embd_v rows of
                 cell_count elements (V stored transposed, as without flash attention)

`llama_state_seq_save_file`'s file holds the same after a header (u32 'ggsq' magic, u32 version, u32 n_tokens,
the tokens) instead of io_magic and seq_id; loading from a file streams it, so a 32K-cell state never sits in memory.
The format has no version of its own: parsing checks every count, type and the exact length, and fails naming what
differs.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

IO_MAGIC = 0xAF143CD8
FILE_MAGIC = 0x67677371  # 'ggsq', LLAMA_STATE_SEQ_MAGIC
FILE_VERSION = 3  # LLAMA_STATE_SEQ_VERSION
TYPES = {0: "f32", 1: "f16", 8: "q8_0"}  # the ggml cache types this module knows (ids from ggml.h)
TYPE_IDS = {name: i for i, name in TYPES.items()}  # llama.cpp's type_k / type_v by name


class StateFormatError(ValueError):
    """The bytes are not the sequence state this module knows how to read."""


@dataclass
class SeqState:
    """One sequence's KV cache: cell positions and, per layer, K and V as byte arrays with a cell axis
    (K and untransposed V: [cells, row bytes]; transposed V: [n_embd_v, cells, element bytes])."""

    positions: np.ndarray
    v_trans: bool
    k: list[tuple[int, np.ndarray]]
    v: list[tuple[int, np.ndarray]]

    @property
    def cells(self) -> int:
        return len(self.positions)


class _Reader:
    def __init__(self, blob: bytes):
        self.blob, self.at = blob, 0

    def take(self, fmt: str):
        if self.at + struct.calcsize(fmt) > len(self.blob):
            raise StateFormatError(f"sequence state ends at byte {len(self.blob)}, inside a field at {self.at}")
        values = struct.unpack_from("<" + fmt, self.blob, self.at)
        self.at += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if self.at + n > len(self.blob):
            raise StateFormatError(f"sequence state ends at byte {len(self.blob)}, inside tensor data at {self.at}")
        out = np.frombuffer(self.blob, np.uint8, n, self.at).reshape(shape)
        self.at += n
        return out


def _type(r: _Reader, what: str) -> int:
    t = r.take("i")
    if t not in TYPES:
        raise StateFormatError(f"{what}: ggml type {t} is not one of {sorted(TYPES)} ({', '.join(TYPES.values())})")
    return t


def parse(blob: bytes) -> SeqState:
    """The state of `llama_state_seq_get_data` for one sequence (see the module docstring for the layout)."""
    r = _Reader(blob)
    magic, _seq, n_stream = r.take("IiI")
    if magic != IO_MAGIC:
        raise StateFormatError(f"sequence state magic {magic:#x}, expected {IO_MAGIC:#x}")
    if n_stream != 1:
        raise StateFormatError(f"sequence state has {n_stream} KV streams, expected 1 (a unified cache)")
    cells = r.take("I")
    meta = np.frombuffer(r.array((cells, 12)).tobytes(), "<i4").reshape(cells, 3)
    if (meta[:, 1] != 1).any():
        raise StateFormatError("a cell of the sequence state lists other than one sequence id")
    v_trans, n_layer = r.take("II")
    if v_trans not in (0, 1):
        raise StateFormatError(f"sequence state v_trans {v_trans}, expected 0 or 1")
    k = [(_type(r, f"K layer {i}"), r.array((cells, r.take("Q")))) for i in range(n_layer)]
    v = []
    for i in range(n_layer):
        t = _type(r, f"V layer {i}")
        if v_trans:
            size, n_embd = r.take("II")
            v.append((t, r.array((n_embd, cells, size))))
        else:
            v.append((t, r.array((cells, r.take("Q")))))
    if r.at != len(blob):
        raise StateFormatError(f"sequence state has {len(blob) - r.at} bytes after its KV cache (a model with SWA "
                               "or recurrent memory?)")
    return SeqState(meta[:, 0].copy(), bool(v_trans), k, v)


def write_body(state: SeqState, out: BinaryIO, cells: int | None = None) -> None:
    """The state after its header (n_stream onwards), its cells repeated up to `cells` (default: as they are) and
    numbered 0..cells-1 for sequence 0 when tiled; written layer by layer, so memory holds one layer at a time."""
    n = state.cells if cells is None else cells
    take = np.arange(n) % state.cells
    positions = state.positions if cells is None else np.arange(n)
    meta = np.stack([positions, np.ones(n), np.zeros(n)], 1).astype("<i4")
    out.write(struct.pack("<II", 1, n) + meta.tobytes() + struct.pack("<II", int(state.v_trans), len(state.k)))
    for t, rows in state.k:
        out.write(struct.pack("<iQ", t, rows.shape[1]) + np.take(rows, take, 0).tobytes())
    for t, rows in state.v:
        if state.v_trans:
            out.write(struct.pack("<iII", t, rows.shape[2], rows.shape[0]) + np.take(rows, take, 1).tobytes())
        else:
            out.write(struct.pack("<iQ", t, rows.shape[1]) + np.take(rows, take, 0).tobytes())


def read(ctx, seq_id: int = 0) -> SeqState:
    """Sequence `seq_id`'s state in the llama.cpp context `ctx` (a `llama_context_p`)."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    if llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id) != size:
        raise RuntimeError("llama_state_seq_get_data wrote less than llama_state_seq_get_size said")
    return parse(bytes(buf))


def load(ctx, state: SeqState, cells: int | None = None, folder: str | None = None) -> None:
    """Replace sequence 0 in `ctx` by `state`, tiled to `cells`; through a temporary state file in `folder` (removed
    whatever happens), which llama.cpp reads in pieces instead of from one buffer as large as the cache."""
    import llama_cpp

    fd, path = tempfile.mkstemp(suffix=".ggsq", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<III", FILE_MAGIC, FILE_VERSION, 0))  # no tokens
            write_body(state, f, cells)
        tokens, n_tokens = (llama_cpp.llama_token * 1)(), ctypes.c_size_t(0)  # a null tokens buffer reads nothing
        llama_cpp.llama_state_seq_load_file(ctx, path.encode(), 0, tokens, 1, ctypes.byref(n_tokens))
    finally:
        os.unlink(path)
    n = state.cells if cells is None else cells
    last = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0)
    if last != int(state.positions[-1] if cells is None else n - 1):
        raise RuntimeError(f"llama.cpp did not load the sequence state of {n} cells (last position {last})")

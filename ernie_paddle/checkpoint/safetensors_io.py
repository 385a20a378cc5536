"""Reading and writing safetensors checkpoints with numpy, one tensor at a time.

The `safetensors` package's numpy API cannot return bfloat16 (numpy has no such dtype), and the released
ERNIE weights are bf16, so the format (an 8-byte little-endian header length, a JSON header, raw data) is read
here directly, one positioned read per tensor: only the requested tensor is read, bf16 is widened to float32 exactly, and
every inconsistency is reported with the file and tensor name. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ernie_paddle.errors import CheckpointError
from ernie_paddle.files import INDEX_FILE, SINGLE_FILE, pickled_files, shard_file

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024
# Largest shard written by default: 5 GB = 5e9 bytes, as Hugging Face's `max_shard_size="5GB"` (and `--max-shard-size`).
MAX_SHARD_BYTES = 5_000_000_000



def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 stored as uint16 to float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even), returned as uint16 bit patterns."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the data section
    end: int


class SafetensorsFile:
    """One `.safetensors` file: the header is parsed and checked at open; `get(name)` reads just that tensor."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, "
                                          f"file size {size})")
                header_bytes = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
            if dtype not in _ITEMSIZE:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
            if end - start != nbytes or start < 0:
                raise CheckpointError(f"{path}: tensor '{name}' header is inconsistent: shape {list(shape)} "
                                      f"{dtype} needs {nbytes} bytes, offsets give {end - start}")
            if end > data_len:
                raise CheckpointError(f"{path}: file is truncated: tensor '{name}' ends at byte "
                                      f"{self._data_start + end} but the file has {size} bytes")
            self.tensors[name] = TensorInfo(dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, *, widen_bf16: bool = True) -> np.ndarray:
        """A copy of tensor `name`; bf16 becomes float32 unless `widen_bf16` is False (then raw uint16).

        Read with one positioned read into a fresh array (not through a memory map, whose pages would stay
        resident and count against the process: reading a 41 GB checkpoint through mmap peaked at 21 GB RSS)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        count = int(np.prod(info.shape, dtype=np.int64))
        arr = np.fromfile(self.path, dtype=_NP_DTYPES[info.dtype], count=count,
                          offset=self._data_start + info.start).reshape(info.shape)
        if arr.size != count:
            raise CheckpointError(f"{self.path}: tensor '{name}' could not be read in full")
        if info.dtype == "BF16" and widen_bf16:
            return bf16_to_f32(arr)
        return arr


class CheckpointReader:
    """All tensors of a checkpoint directory: `model.safetensors`, or an index plus shards."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' "
                                      f"object): {e}") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                p = os.path.join(directory, shard)
                if not os.path.isfile(p):
                    raise CheckpointError(f"{p}: shard listed in {INDEX_FILE} is missing")
                self._files[shard] = SafetensorsFile(p)
            for name, shard in weight_map.items():
                if name not in self._files[shard].tensors:
                    raise CheckpointError(f"{os.path.join(directory, shard)}: {INDEX_FILE} places tensor "
                                          f"'{name}' in this shard but the shard does not hold it")
                self._where[name] = shard
            for shard, sf in self._files.items():
                for name in sf.keys():
                    if name not in weight_map:
                        raise CheckpointError(f"{sf.path}: tensor '{name}' is not listed in {INDEX_FILE}")
                    if weight_map[name] != shard:
                        raise CheckpointError(f"{sf.path}: duplicate tensor '{name}' (the index places it in "
                                              f"{weight_map[name]})")
        elif os.path.isfile(single):
            self._files[SINGLE_FILE] = SafetensorsFile(single)
            self._where = {n: SINGLE_FILE for n in self._files[SINGLE_FILE].keys()}
        else:
            if not os.path.isdir(directory):
                raise CheckpointError(f"{directory}: no such checkpoint directory")
            pickled = pickled_files(directory)
            if pickled:
                raise CheckpointError(f"{os.path.join(directory, pickled[0])}: pickled Paddle weights are not loaded "
                                      f"by default (unpickling a file can run code); if you trust it, pass "
                                      f"--allow-pickle (allow_pickle=True), or convert it once to safetensors with "
                                      f"`ernie-paddle convert --allow-pickle`")
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._files[self._where[name]].tensors[name]

    def file_of(self, name: str) -> str:
        return self._files[self._where[name]].path

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: missing tensor '{name}'")
        return self._files[self._where[name]].get(name)

    def close(self) -> None:
        """Nothing is held open (each `get` is one positioned read); here for the reader interface that
        `pdparams.PickleReader` shares."""


def _encode(a: np.ndarray, dtype: str) -> tuple[str, bytes]:
    """Bytes of `a` converted to safetensors dtype `dtype` ("BF16", "F16", "F32")."""
    if dtype == "BF16":
        return "BF16", f32_to_bf16(a.astype(np.float32, copy=False)).tobytes()
    if dtype == "F16":
        return "F16", np.ascontiguousarray(a, dtype=np.float16).tobytes()
    if dtype == "F32":
        return "F32", np.ascontiguousarray(a, dtype=np.float32).tobytes()
    raise ValueError(f"unsupported output dtype {dtype}")


def write_arrays(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write numpy arrays as they are (their own dtype) into one safetensors file at `path` (not atomic: callers
    write into `atomic.atomic_path`)."""
    by_dtype = {np.dtype(v): k for k, v in _NP_DTYPES.items() if k != "BF16"}
    encoded = []
    for name, a in arrays.items():
        dt = by_dtype.get(a.dtype)
        if dt is None:
            raise ValueError(f"tensor '{name}': no safetensors dtype for numpy {a.dtype}")
        encoded.append((name, list(a.shape), dt, np.ascontiguousarray(a).tobytes()))
    _write_encoded(path, encoded, metadata)


def _write_encoded(path: str, encoded: list[tuple[str, list[int], str, bytes]], metadata: dict | None) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, shape, dt, data in encoded:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for *_, data in encoded:
            f.write(data)


class ShardedWriter:
    """Writes tensors one by one into shards of at most `max_shard_bytes` inside `directory`, then the index.

    Memory is bounded by one shard. `directory` is the caller's staging folder (`atomic.atomic_dir`), so an
    interrupted run never leaves a half-written checkpoint.
    """

    def __init__(self, directory: str, max_shard_bytes: int = MAX_SHARD_BYTES, metadata: dict | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata
        self._pending: list[tuple[str, list[int], str, bytes]] = []  # already encoded: memory = one shard
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total = 0

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        nbytes = array.size * _ITEMSIZE[dtype]
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, list(array.shape), *_encode(array, dtype)))
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        i = len(self._shards)
        fname = f"shard-{i:05d}.safetensors"
        _write_encoded(os.path.join(self.directory, fname), self._pending, self.metadata)
        self._shards.append((fname, [e[0] for e in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def finish(self) -> list[str]:
        """Finish the shards and name them as Hugging Face does, writing the index when there are several."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(os.path.join(self.directory, self._shards[0][0]), os.path.join(self.directory, SINGLE_FILE))
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = shard_file(i + 1, n)
            os.rename(os.path.join(self.directory, tmp), os.path.join(self.directory, final))
            files.append(final)
            weight_map.update({nm: final for nm in names})
        with open(os.path.join(self.directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
        return files + [INDEX_FILE]

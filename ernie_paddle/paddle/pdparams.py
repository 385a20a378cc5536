"""Paddle's pickled `.pdparams` weights, read only when the user allows it (unpickling a file can run code).

The one reader that needs Paddle (`paddle.load`); `checkpoint.open_checkpoint` imports it only when pickles are
allowed and the directory has no safetensors, so reading safetensors never imports Paddle.
"""

from __future__ import annotations


import os

import numpy as np
import paddle

from ernie_paddle.errors import CheckpointError
from ernie_paddle.checkpoint.safetensors_io import TensorInfo
from ernie_paddle.files import pickled_files


class PickleReader:
    """All tensors of the `.pdparams` files in a directory (the same reader interface as `CheckpointReader`)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._arrays: dict[str, np.ndarray] = {}
        self._where: dict[str, str] = {}
        for f in pickled_files(directory):
            path = os.path.join(directory, f)
            state = paddle.load(path, return_numpy=True)
            for name, a in state.items():
                if name in self._arrays:
                    raise CheckpointError(f"{path}: duplicate tensor '{name}' (also in {self._where[name]})")
                self._arrays[name] = np.asarray(a)
                self._where[name] = path

    def names(self) -> list[str]:
        return list(self._arrays)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(str(self._arrays[name].dtype), tuple(self._arrays[name].shape), 0, 0)

    def file_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        a = self._arrays[name]
        return a.astype(np.float32) if a.dtype != np.float16 and a.dtype.kind == "f" else a

    def close(self) -> None:
        self._arrays.clear()

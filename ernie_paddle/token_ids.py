"""The token-id range check shared by the Paddle model and the ONNX Runtime model (numpy only)."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Every id must index the embedding: the error names the first bad id and its position."""
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab_size):  # the per-token fast path
        return
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        pos = tuple(int(i) for i in bad[0])
        raise InputError(f"token id {int(ids[pos])} at position {pos[-1]} is out of range for vocab_size "
                         f"{vocab_size}")

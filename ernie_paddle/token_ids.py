"""The token-id range check shared by the Paddle model and the ONNX Runtime model, and the range search it and
the position check (`rope.check_position_ids`) share (numpy only)."""

from __future__ import annotations

import numpy as np

from ernie_paddle.errors import InputError


def first_out_of_range(values: np.ndarray, limit: int) -> tuple[int, ...] | None:
    """The index of the first value outside [0, limit), or None. Checked by min and max first: the per-step case
    (every value in range) costs two reductions, not a mask and a search."""
    if values.size == 0 or (values.min() >= 0 and values.max() < limit):
        return None
    return tuple(int(i) for i in np.argwhere((values < 0) | (values >= limit))[0])


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Every id must index the embedding: the error names the first bad id and its position."""
    pos = first_out_of_range(ids, vocab_size)
    if pos is not None:
        raise InputError(f"token id {int(ids[pos])} at position {pos[-1]} is out of range for vocab_size "
                         f"{vocab_size}")

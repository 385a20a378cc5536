"""ERNIE's rotary frequencies in one place (numpy only): the Paddle model, the GPU kernels and both ONNX
flavours all derive their angles from here, in fp32 as every reference implementation does."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, computed in fp32 (read-only, cached: it is used on every decode step)."""
    f = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    f = f.astype(np.float32)
    f.flags.writeable = False
    return f


def angle_table(max_pos: int, head_dim: int, theta: float) -> np.ndarray:
    """angles [max_pos, d/2] = pos_fp32 * inv_freq_fp32 (elementwise, fp32)."""
    return np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq(head_dim, theta)[None, :]

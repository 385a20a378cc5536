"""ERNIE's rotary frequencies in one place (numpy only): the Paddle model, the GPU kernels and both ONNX
flavours all derive their angles from here, in fp32 as every reference implementation does."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ernie_paddle.errors import InputError
from ernie_paddle.token_ids import first_out_of_range


@lru_cache(maxsize=8)
def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/d) for i < d/2 as the fp32 values nearest the exact ones (read-only, cached: used every step).

    Computed in float64 and rounded once. An fp32 `pow` is not correctly rounded, and which one runs depends on
    the install (numpy's SIMD or libm powf, torch's pow): they differ by an ulp here and there, and at position
    131071 one ulp of a high frequency moves the angle by ~1e-3 rad. Rounding once gives one table everywhere.
    """
    f = (np.float64(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    f.flags.writeable = False
    return f


def angle_table(max_pos: int, head_dim: int, theta: float) -> np.ndarray:
    """angles [max_pos, d/2] = pos_fp32 * inv_freq_fp32 (elementwise, fp32): exact products, the same everywhere."""
    return np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq(head_dim, theta)[None, :]


def cos_sin_tables(max_pos: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_pos, d/2] of the fp32 angles, each rounded once from float64 (an fp32 cos is within a few
    ulps of that, differently on different CPUs; the exported tables should not depend on where they were made)."""
    angles = angle_table(max_pos, head_dim, theta).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def check_position_ids(positions: np.ndarray, max_positions: int) -> None:
    """Every position must lie in the model's window [0, max_position_embeddings): the error names the first bad
    one. Explicit position ids are not bounded by the sequence length check, and the fused GPU RoPE and the ONNX
    RotaryEmbedding caches are tables of exactly max_position_embeddings rows."""
    positions = np.asarray(positions)
    at = first_out_of_range(positions, max_positions)
    if at is not None:
        raise InputError(f"position id {int(positions[at])} is out of range for max_position_embeddings "
                         f"{max_positions} (valid: 0 to {max_positions - 1})")

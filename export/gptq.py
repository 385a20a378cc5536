"""Calibrated weight quantisation in the GPTQ style: error-compensated rounding with a layer-input Hessian.

Each linear weight W [N out, K in] is quantised one input column at a time; the rounding error of column c is
spread over the columns not yet quantised, weighted by the inverse Hessian H = 2 X^T X of that layer's inputs X
(collected from the Paddle model by `paddle.calibration.layer_hessians`). Block scales are chosen, as in round-to-nearest, from
each block's value of largest magnitude, but on the error-updated weights. The codes and scales have exactly the
layout of `quantize.quantize_rows`, so MatMulNBits and QMoE run them unchanged.
"""

from __future__ import annotations

import numpy as np

from ernie_paddle.export.quantize import quantize_rows


def gptq_rows(w_nk: np.ndarray, hessian: np.ndarray, bits: int, block: int, damp: float = 0.01
              ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of w [N, K] with input Hessian [K, K]; returns (codes uint8 [N, K/block, block], scales [N, K/block])."""
    n, k = w_nk.shape
    if k % block:
        return quantize_rows(w_nk, bits, block)  # ragged blocks: fall back to round-to-nearest
    w = w_nk.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor: H^-1 = U^T U
    half = 1 << (bits - 1)
    nb = k // block
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    for g in range(nb):
        lo, hi = g * block, (g + 1) * block
        blk = w[:, lo:hi]
        m = np.take_along_axis(blk, np.abs(blk).argmax(axis=1)[:, None], axis=1)[:, 0]
        s = (m / -half).astype(np.float32)
        scales[:, g] = s
        s64 = np.where(s == 0, 1.0, s).astype(np.float64)
        for c in range(lo, hi):
            q = np.clip(np.rint(w[:, c] / s64), -half, half - 1)
            codes[:, c] = (q + half).astype(np.uint8)
            err = (w[:, c] - q * s64) / u[c, c]
            if c + 1 < k:
                w[:, c + 1:] -= np.outer(err, u[c, c + 1:])
    return codes.reshape(n, nb, block), scales


class GPTQ:
    """A quantiser for `ErnieOrtBuilder`: GPTQ where calibration saw the layer, round-to-nearest otherwise."""

    def __init__(self, hessians: dict[str, np.ndarray]):
        self.hessians = hessians
        self.calibrated: list[str] = []

    def __call__(self, name: str, w_nk: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        h = self.hessians.get(name)
        if h is None or h.shape[0] != w_nk.shape[1]:
            return quantize_rows(w_nk, bits, block)
        self.calibrated.append(name)
        return gptq_rows(w_nk, h, bits, block)

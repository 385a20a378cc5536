"""Calibrated weight quantisation in the GPTQ style: error-compensated rounding with a layer-input Hessian.

Each linear weight W [N out, K in] is quantised one input column at a time; the rounding error of column c is
spread over the columns not yet quantised, weighted by the inverse Hessian H = 2 X^T X of that layer's inputs X
(collected from the Paddle model by `paddle.calibration.layer_hessians`). Block scales are chosen by one of the
rules of `precisions.SCALE_RULES`, as in round-to-nearest, but on the error-updated weights as each block begins.
The codes and scales have exactly the layout of `quantize.quantize_rows`, so MatMulNBits and QMoE run them
unchanged.
"""

from __future__ import annotations

import numpy as np

from ernie_paddle.errors import InputError
from ernie_paddle.precisions import DEFAULT_SCALE_RULE
from ernie_paddle.export.quantize import block_scales, check_rule, quantize_rows


def gptq_rows(w_nk: np.ndarray, hessian: np.ndarray, bits: int, block: int, damp: float = 0.01,
              rule: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of w [N, K] with input Hessian [K, K]; returns (codes uint8 [N, K/block, block], scales [N, K/block])."""
    n, k = w_nk.shape
    if k % block:
        return quantize_rows(w_nk, bits, block, rule)  # ragged blocks: fall back to round-to-nearest
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
    for g in range(nb):  # a quantisation block at a time: its columns in turn, then the rest in one product
        lo, hi = g * block, (g + 1) * block
        s = block_scales(w[:, None, lo:hi].astype(np.float32), bits, rule)[:, 0]
        scales[:, g] = s
        s64 = np.where(s == 0, 1.0, s).astype(np.float64)
        errs = np.empty((n, block))
        for c in range(lo, hi):
            q = np.clip(np.rint(w[:, c] / s64), -half, half - 1)
            codes[:, c] = (q + half).astype(np.uint8)
            errs[:, c - lo] = err = (w[:, c] - q * s64) / u[c, c]
            w[:, c + 1:hi] -= np.outer(err, u[c, c + 1:hi])
        # the block's errors spread over the columns after it: the sum of its columns' outer products, as one GEMM
        w[:, hi:] -= errs @ u[lo:hi, hi:]
    return codes.reshape(n, nb, block), scales


class GPTQ:
    """A quantiser for `ErnieOrtBuilder`: GPTQ where calibration saw the layer, round-to-nearest otherwise, both
    with `rule`'s block scales. `hessians`: a dict by weight name, or anything with its `get`
    (`paddle.calibration.StreamedHessians`)."""

    name = "gptq"

    def __init__(self, hessians, rule: str = DEFAULT_SCALE_RULE):
        self.hessians = hessians
        self.rule = check_rule(rule)
        self.calibrated: list[str] = []

    def __call__(self, name: str, w_nk: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        h = self.hessians.get(name)
        if h is None or h.shape[0] != w_nk.shape[1]:
            return quantize_rows(w_nk, bits, block, self.rule)
        self.calibrated.append(name)
        return gptq_rows(w_nk, h, bits, block, rule=self.rule)


def streamed_gptq(model_dir: str, cfg, text_path: str, windows: int = 32, rule: str = DEFAULT_SCALE_RULE):
    """GPTQ calibrated on `windows` 128-token windows of the UTF-8 file `text_path` (tokenised by the checkpoint's
    tokenizer), its Hessians made one layer at a time while the export reads that layer (`StreamedHessians`).
    Returns (the quantiser, the Hessians' source to close after the export)."""
    from ernie_paddle.corpus import read_corpus
    from ernie_paddle.paddle.calibration import StreamedHessians, calibration_batches
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    ids = np.array(ErnieTokenizer(model_dir).encode(read_corpus(text_path)), np.int64)
    try:
        batches = calibration_batches(ids, windows)
    except ValueError as e:
        raise InputError(f"--calibration-text {text_path}: {e}") from None
    hessians = StreamedHessians(model_dir, cfg, batches)
    return GPTQ(hessians, rule), hessians

"""Weight quantisation for ONNX Runtime's MatMulNBits and QMoE ops (symmetric round-to-nearest).

Both ops dequantise `w = (q - 2^(bits-1)) * scale` with the default zero point, quantising along the input
(K) axis in blocks. Per block the value of largest magnitude `m` sets `scale = m / -2^(bits-1)`, so `m` maps
to the code 0 exactly and the full signed range [-2^(bits-1), 2^(bits-1) - 1] is used (llama.cpp's Q4_0 rule).
"""

from __future__ import annotations

import numpy as np

from ernie_paddle.checkpoint.layout import TensorMap
from ernie_paddle.precisions import expert_block


def quantize_rows(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes uint8 [N, ceil(K/block), block], scales float32 [N, ceil(K/block)])."""
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    blocks = w.reshape(n, nb, block).astype(np.float32)
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    m = np.take_along_axis(blocks, idx, axis=-1)[..., 0]  # signed value of largest magnitude
    half = 1 << (bits - 1)
    scale = (m / -half).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.clip(np.rint(blocks / safe), -half, half - 1) + half
    return q.astype(np.uint8), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `quantize_rows` (unpacked codes): [N, K] float32."""
    w = (q.astype(np.float32) - (1 << (bits - 1))) * scale[..., None]
    return w.reshape(q.shape[0], -1)[:, :k]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis: 8 bits as is, 4 bits two per byte, 2 bits four per byte (low bits first)."""
    if bits == 8:
        return q
    if bits == 4:
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if bits == 2:
        return (q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)).astype(np.uint8)
    raise ValueError(f"unsupported bit width {bits}")


def rtn(name: str, w_nk: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest: the default quantiser (a `Quantizer`: name, weight [N, K] -> codes, scales)."""
    return quantize_rows(w_nk, bits, block)


def matmul_nbits_weights(w_in_out: np.ndarray, bits: int, block: int, quantizer=rtn, name: str = ""
                         ) -> tuple[np.ndarray, np.ndarray]:
    """A Linear weight in Paddle layout [K, N] -> MatMulNBits B uint8 [N, K/block, block*bits/8], scales [N*K/block]."""
    q, scale = quantizer(name, np.ascontiguousarray(w_in_out.T), bits, block)
    return pack(q, bits), scale.reshape(-1).astype(np.float32)


def qmoe_weights(w_nk: np.ndarray, bits: int, block: int | None, quantizer=rtn, name: str = "",
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One expert matrix [N, K] (rows = outputs) -> QMoE codes uint8 [N, K*bits/8] and scales.

    `block=None` gives per-output-channel scales [N]; otherwise block-wise scales [N, K/block]. `rows` reorders
    the output rows after quantisation (fc1's interleaved gate/up rows).
    """
    n, k = w_nk.shape
    q, scale = quantizer(name, w_nk, bits, block or k)
    if rows is not None:
        q, scale = q[rows], scale[rows]
    codes = pack(q.reshape(n, -1)[:, :k] if block is None else q.reshape(n, -1), bits)
    return codes, (scale[:, 0] if block is None else scale)


def round_trip(m: TensorMap, w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """What a quantised `ort` graph computes with for the canonical tensor of map `m` (Paddle layout).

    Linear weights come back dequantised exactly as MatMulNBits / QMoE see them; the embedding, norms and the
    fp32 router are not quantised (`Role.quantised`). Used to check that a quantised graph differs from Paddle only
    by rounding.
    """
    if not m.role.quantised:
        return w
    k = w.shape[0]
    is_expert = m.role.routed_expert
    blk = expert_block(bits, block) if is_expert else block
    q, scale = quantize_rows(np.ascontiguousarray(w.T), bits, blk or k)
    if is_expert:  # QMoE scales are stored in fp16 (see ort_graph.experts_quantized)
        scale = scale.astype(np.float16).astype(np.float32)
    return dequantize_rows(q, scale, bits, k).T

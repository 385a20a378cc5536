"""Weight quantisation for ONNX Runtime's MatMulNBits and QMoE ops (symmetric round-to-nearest).

Both ops dequantise `w = (q - 2^(bits-1)) * scale` with the default zero point, quantising along the input
(K) axis in blocks. Two rules choose a block's scale (`SCALE_RULES`):
- `absmax`: the value of largest magnitude `m` sets `scale = m / -2^(bits-1)`, so `m` maps to the code 0 exactly
  and the full signed range [-2^(bits-1), 2^(bits-1) - 1] is used (llama.cpp's Q4_0 rule).
- `mse`: the scale of least squared error in the block, searched from the absmax scale down (clipping the largest
  values buys a finer step for the rest) and refined by one least-squares step on the chosen codes. The same bytes
  as absmax; only the numbers in them differ.
"""

from __future__ import annotations

import numpy as np

from ernie_paddle.checkpoint.layout import TensorMap
from ernie_paddle.precisions import DEFAULT_SCALE_RULE, SCALE_RULES, expert_block

MSE_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # of the absmax scale: the candidates `mse` tries
ROWS_AT_ONCE = 4096  # rows quantised together: bounds the temporaries of a 103,424-row LM head


def block_scales(blocks: np.ndarray, bits: int, rule: str = "absmax") -> np.ndarray:
    """Scales float32 [..., nb] for `blocks` [..., nb, block] by `rule` (see the module docstring)."""
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    m = np.take_along_axis(blocks, idx, axis=-1)[..., 0]  # signed value of largest magnitude
    half = 1 << (bits - 1)
    scale = (m / -half).astype(np.float32)
    if rule == "absmax":
        return scale
    check_rule(rule)
    best, best_err = scale, _block_error(blocks, scale, half)
    for f in MSE_FRACTIONS[1:]:
        candidate = (scale * np.float32(f)).astype(np.float32)
        err = _block_error(blocks, candidate, half)
        best, best_err = np.where(err < best_err, candidate, best), np.minimum(err, best_err)
    q = _codes(blocks, best, half)  # the least-squares scale for the chosen codes: <q, w> / <q, q>
    qq = (q * q).sum(axis=-1)
    refined = np.where(qq > 0, (q * blocks).sum(axis=-1) / np.where(qq > 0, qq, 1), best).astype(np.float32)
    return np.where(_block_error(blocks, refined, half) < best_err, refined, best)


def _codes(blocks: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    """Signed codes in [-half, half - 1] (float) of `blocks` at `scale`; a zero scale gives zero codes."""
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    return np.clip(np.rint(blocks / safe), -half, half - 1)


def _block_error(blocks: np.ndarray, scale: np.ndarray, half: int) -> np.ndarray:
    """Each block's squared rounding error at `scale`."""
    return np.square(_codes(blocks, scale, half) * scale[..., None] - blocks).sum(axis=-1)


def quantize_rows(w: np.ndarray, bits: int, block: int, rule: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes uint8 [N, ceil(K/block), block], scales float32 [N, ceil(K/block)])."""
    n, k = w.shape
    nb = -(-k // block)
    half = 1 << (bits - 1)
    codes = np.empty((n, nb, block), np.uint8)
    scales = np.empty((n, nb), np.float32)
    for lo in range(0, n, ROWS_AT_ONCE):
        rows = w[lo:lo + ROWS_AT_ONCE].astype(np.float32)
        if nb * block != k:
            rows = np.pad(rows, ((0, 0), (0, nb * block - k)))
        blocks = rows.reshape(len(rows), nb, block)
        scale = block_scales(blocks, bits, rule)
        codes[lo:lo + ROWS_AT_ONCE] = _codes(blocks, scale, half) + half
        scales[lo:lo + ROWS_AT_ONCE] = scale
    return codes, scales


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


def check_rule(rule: str) -> str:
    """`rule` if it is one of `SCALE_RULES`, else a ValueError naming them."""
    if rule not in SCALE_RULES:
        raise ValueError(f"scale rule must be one of {', '.join(SCALE_RULES)}, got {rule!r}")
    return rule


class RoundToNearest:
    """Round-to-nearest with `rule`'s block scales (`DEFAULT_SCALE_RULE` unless told): the default quantiser. A
    quantiser is called with (canonical name, weight [N, K], bits, block) and returns (codes, scales); its `name`
    and `rule` go into the manifest."""

    name = "rtn"

    def __init__(self, rule: str = DEFAULT_SCALE_RULE):
        self.rule = check_rule(rule)

    def __call__(self, name: str, w_nk: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        return quantize_rows(w_nk, bits, block, self.rule)


rtn = RoundToNearest()


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


def round_trip(m: TensorMap, w: np.ndarray, bits: int, block: int, rule: str = DEFAULT_SCALE_RULE,
               attention_bits: int | None = None) -> np.ndarray:
    """What a quantised `ort` graph computes with for the canonical tensor of map `m` (Paddle layout), exported
    with round-to-nearest and `rule`'s scales (and `attention_bits` for the attention projections, if given).

    Linear weights come back dequantised exactly as MatMulNBits / QMoE see them; the embedding, norms and the
    fp32 router are not quantised (`Role.quantised`). Used to check that a quantised graph differs from Paddle only
    by rounding.
    """
    if not m.role.quantised:
        return w
    k = w.shape[0]
    bits = attention_bits if attention_bits and m.role.attention else bits
    is_expert = m.role.routed_expert
    blk = expert_block(bits, block) if is_expert else block
    q, scale = quantize_rows(np.ascontiguousarray(w.T), bits, blk or k, rule)
    if is_expert:  # QMoE scales are stored in fp16 (see ort_graph.experts_quantized)
        scale = scale.astype(np.float16).astype(np.float32)
    return dequantize_rows(q, scale, bits, k).T

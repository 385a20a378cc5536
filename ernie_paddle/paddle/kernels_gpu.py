"""Paddle's fused GPU kernels for the ERNIE model: RMSNorm, interleaved RoPE, flash attention, and the MoE
through `moe_gate_dispatch` + `batched_gemm` + `moe_combine` (the ops ERNIE's own training stack uses).

Chosen automatically when the model runs on a GPU (`model.use_fused_kernels()`); every function has the same
math as the unfused reference path in `modeling.py`, which is also the CPU implementation. Facts about Paddle
3.3.1's ops this relies on, read from the kernels' source (docs/gpu.md says what has run on a GPU so far):
`fused_rotary_position_embedding(use_neox_rotary_style=True)` rotates *adjacent* pairs, i.e. ERNIE's interleaved
RoPE (the flag name is the opposite of HF's); the dispatch op takes fp32 softmax probabilities and adds the
correction bias for selection only, returning unbiased, not-yet-renormalised weights; flash attention's causal
mask is only right when q_len == kv_len.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie_paddle.paddle.moe import mix_weights, router_probs


def gpu_active() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


# ---- norm / rope / attention ------------------------------------------------------------------------------------
def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    from paddle.incubate.nn.functional import fused_rms_norm

    return fused_rms_norm(x, weight, None, eps, begin_norm_axis=x.ndim - 1)[0]


def rope_tables(head_dim: int, theta: float, max_pos: int, dtype: str) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Full-width cos/sin tables [1, max_pos, 1, d] in ERNIE's layout [θ0, θ0, θ1, θ1, ...], from
    `rope.cos_sin_tables` (the tables the ONNX export uses)."""
    from ernie_paddle.rope import cos_sin_tables

    cos, sin = (np.repeat(t, 2, axis=-1)[None, :, None, :] for t in cos_sin_tables(max_pos, head_dim, theta))
    return paddle.to_tensor(cos).astype(dtype), paddle.to_tensor(sin).astype(dtype)


def rope(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor,
         position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    from paddle.incubate.nn.functional import fused_rotary_position_embedding

    q, k, _ = fused_rotary_position_embedding(q, k, None, sin=sin, cos=cos, position_ids=position_ids,
                                              use_neox_rotary_style=True)  # True = adjacent pairs
    return q, k


def flash_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, causal: bool) -> paddle.Tensor:
    """q [B, T, nh, d], k/v [B, S, nkv, d] (GQA native); only for q_len == kv_len (causal) or no mask at all."""
    from paddle.nn.functional.flash_attention import flash_attention as fa

    return fa(q, k, v, causal=causal, training=False)[0]


# ---- MoE ---------------------------------------------------------------------------------------------------
def fused_moe(h: paddle.Tensor, weights_gate: paddle.Tensor, bias: paddle.Tensor | None, k: int, norm_min: float,
              w_up_gate: paddle.Tensor, w_down: paddle.Tensor,
              dispatch: Callable | None = None, grouped_gemm: Callable | None = None,
              combine: Callable | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Routed experts of tokens h [N, H] on stacked weights [E, H, 2I] / [E, I, H]; returns (output [N, H],
    expert ids [N, k]).

    `dispatch`, `grouped_gemm` and `combine` default to Paddle's GPU ops; tests pass CPU stand-ins with the same
    contracts (tests/gpu_standins.py) to check the data flow on CPU.
    """
    if dispatch is None:
        from paddle.incubate.nn.functional import moe_gate_dispatch as dispatch
    if grouped_gemm is None:
        from paddle.incubate.nn.functional import batched_gemm as grouped_gemm
    if combine is None:
        from paddle.incubate.nn.functional import moe_combine as combine
    n, e = h.shape[0], w_up_gate.shape[0]
    probs = router_probs(h, weights_gate)
    corr = bias if bias is not None else paddle.zeros([e], "float32")
    y, _, scatter_index, expert_offset, expert_id = dispatch(h, probs, corr, k, n, False)
    # mixing weights from `moe.mix_weights`, not the op's combine weights, whose bias handling varies between
    # its versions
    experts = expert_id.astype("int64")
    cw = mix_weights(probs, experts, norm_min)
    offsets = expert_offset.tolist()  # one host sync: rows per expert
    counts = [int(b - a) for a, b in zip([0] + offsets[:-1], offsets)]
    hidden = grouped_gemm(y, w_up_gate, counts)
    hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
    gate, up = paddle.split(hidden, 2, axis=-1)
    out = grouped_gemm(F.silu(gate) * up, w_down, counts)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return combine(out, cw.astype(out.dtype), scatter_index), experts

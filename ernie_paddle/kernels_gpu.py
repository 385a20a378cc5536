"""Paddle's fused GPU kernels for the ERNIE model: RMSNorm, interleaved RoPE, flash attention, and the MoE
through `moe_gate_dispatch` + `batched_gemm` + `moe_combine` (the ops ERNIE's own training stack uses).

Chosen automatically when the model runs on a GPU (`model.use_fused_kernels()`); every function has the same
math as the portable path in `modeling.py`, which stays the reference and the CPU implementation. Flag and
layout facts this relies on (see docs/paddle_notes): `fused_rotary_position_embedding(use_neox_rotary_style=True)`
rotates *adjacent* pairs, i.e. ERNIE's interleaved RoPE (the flag name is the opposite of HF's); the dispatch
op takes fp32 softmax probabilities and adds the correction bias for selection only, returning unbiased,
not-yet-renormalised weights; flash attention's causal mask is only right when q_len == kv_len.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F


def gpu_active() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


# ---- norm / rope / attention ------------------------------------------------------------------------------------
def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    from paddle.incubate.nn.functional import fused_rms_norm

    return fused_rms_norm(x, weight, None, eps, begin_norm_axis=x.ndim - 1)[0]


def rope_tables(head_dim: int, theta: float, max_pos: int, dtype: str) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Full-width cos/sin tables [1, max_pos, 1, d] in ERNIE's layout [θ0, θ0, θ1, θ1, ...] (fp32 math)."""
    from .rope import angle_table

    angles = np.repeat(angle_table(max_pos, head_dim, theta), 2, axis=-1)[None, :, None, :]
    return (paddle.to_tensor(np.cos(angles)).astype(dtype), paddle.to_tensor(np.sin(angles)).astype(dtype))


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
def stack_experts(block) -> None:
    """Replace a MoE block's per-expert MLPs by stacked weights [E, H, 2I] / [E, I, H] (the grouped-GEMM layout)."""
    if getattr(block, "w_up_gate", None) is not None:
        return
    block.w_up_gate = paddle.stack([e.up_gate_proj.weight for e in block.experts])
    block.w_down = paddle.stack([e.down_proj.weight for e in block.experts])
    block.experts = None  # free the per-expert copies


def fused_moe(h: paddle.Tensor, weights_gate: paddle.Tensor, bias: paddle.Tensor | None, k: int, norm_min: float,
              w_up_gate: paddle.Tensor, w_down: paddle.Tensor,
              dispatch: Callable | None = None, grouped_gemm: Callable | None = None,
              combine: Callable | None = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Routed experts of tokens h [N, H]; returns (output [N, H], expert ids [N, k]).

    `dispatch`, `grouped_gemm` and `combine` default to Paddle's GPU ops; tests substitute portable versions
    with the same contracts to check the data flow on CPU.
    """
    if dispatch is None:
        from paddle.incubate.nn.functional import moe_gate_dispatch as dispatch
    if grouped_gemm is None:
        from paddle.incubate.nn.functional import batched_gemm as grouped_gemm
    if combine is None:
        from paddle.incubate.nn.functional import moe_combine as combine
    n, e = h.shape[0], w_up_gate.shape[0]
    probs = F.softmax(paddle.matmul(h.astype("float32"), weights_gate.astype("float32")), axis=-1)  # fp32 router
    corr = bias if bias is not None else paddle.zeros([e], "float32")
    y, _, scatter_index, expert_offset, expert_id = dispatch(h, probs, corr, k, n, False)
    # mixing weights from the *unbiased* probabilities of the chosen experts, renormalised as ERNIE does
    # (taken here rather than from the op's combine weights, whose bias handling varies between its versions)
    cw = paddle.take_along_axis(probs, expert_id.astype("int64"), axis=-1)
    cw = cw / paddle.clip(cw.sum(axis=-1, keepdim=True), min=norm_min)
    offsets = expert_offset.tolist()  # one host sync: rows per expert
    counts = [int(b - a) for a, b in zip([0] + offsets[:-1], offsets)]
    hidden = grouped_gemm(y, w_up_gate, counts)
    hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
    gate, up = paddle.split(hidden, 2, axis=-1)
    out = grouped_gemm(F.silu(gate) * up, w_down, counts)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return combine(out, cw.astype(out.dtype), scatter_index), expert_id.astype("int64")


# ---- portable stand-ins with the GPU ops' contracts (for CPU tests of the data flow) -----------------------
def portable_dispatch(x, probs, corr_bias, k, capacity, use_pad):
    """moe_gate_dispatch's contract from Paddle's pure-Python fallback (its routing outputs) plus the token rows
    placed at `scatter_index` (the fallback leaves `y` zero in Paddle 3.3.1)."""
    from paddle.incubate.nn.functional.moe_gate_dispatch import math_moe_gate_dispatch

    _, cw, scatter_index, expert_offset, expert_id = math_moe_gate_dispatch(x, probs, corr_bias, k, capacity,
                                                                            use_pad)
    n = x.shape[0]
    rows = scatter_index.astype("int64").reshape([k, n])  # row of (slot, token) in expert-sorted order
    src = paddle.arange(n, dtype="int64").unsqueeze(0).expand([k, n]).reshape([-1])
    order = paddle.argsort(rows.reshape([-1]))  # rows ascending -> which token fills each row
    y = paddle.gather(x, paddle.gather(src, order))
    return y, cw, scatter_index, expert_offset, expert_id



def loop_grouped_gemm(x: paddle.Tensor, w: paddle.Tensor, counts: list[int]) -> paddle.Tensor:
    outs, start = [], 0
    for i, c in enumerate(counts):
        if c:
            outs.append(paddle.matmul(x[start:start + c], w[i]))
            start += c
    return paddle.concat(outs)


def gather_combine(x: paddle.Tensor, weights: paddle.Tensor, scatter_index: paddle.Tensor) -> paddle.Tensor:
    """y[t] = Σ_k weights[t, k] · x[scatter_index[k, t]] (moe_combine's contract; [k, T] or flat k-major)."""
    n, k = weights.shape
    index = scatter_index.astype("int64").reshape([k, n]).transpose([1, 0]).reshape([-1])
    rows = paddle.gather(x, index)  # [N*k, H]
    return (rows.reshape([n, k, -1]) * weights.unsqueeze(-1)).sum(axis=1)

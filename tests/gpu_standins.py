"""CPU stand-ins for Paddle's GPU-only MoE ops, with the contracts `kernels_gpu.fused_moe` relies on.

Used only by tests, to run the GPU MoE data flow (dispatch -> grouped GEMM -> combine) on CPU. What they can and
cannot show: `dispatch` takes its routing from Paddle's own pure-Python fallback of `moe_gate_dispatch`, so that
part is Paddle's reading of the op; `grouped_gemm` and `combine` are this project's reading of `batched_gemm` and
`moe_combine` (from the kernels' source), so a misreading of those two would be repeated here and not caught on
CPU. Only the GPU test (`test_fused_kernels_match_the_reference_path_on_gpu`) runs the real ops.
"""

from __future__ import annotations

import paddle


def dispatch(x: paddle.Tensor, probs: paddle.Tensor, corr_bias: paddle.Tensor, k: int, capacity: int,
             use_pad: bool):
    """moe_gate_dispatch's contract from Paddle's pure-Python fallback (its routing outputs) plus the token rows
    placed at `scatter_index` (the fallback leaves `y` zero in Paddle 3.3.1), in the GPU op's dtypes
    (scatter_index and expert_id int32, expert_offset int64; the fallback gives int64)."""
    from paddle.incubate.nn.functional.moe_gate_dispatch import math_moe_gate_dispatch

    _, cw, scatter_index, expert_offset, expert_id = math_moe_gate_dispatch(x, probs, corr_bias, k, capacity,
                                                                            use_pad)
    n = x.shape[0]
    rows = scatter_index.astype("int64").reshape([k, n])  # row of (slot, token) in expert-sorted order
    src = paddle.arange(n, dtype="int64").unsqueeze(0).expand([k, n]).reshape([-1])
    order = paddle.argsort(rows.reshape([-1]))  # rows ascending -> which token fills each row
    y = paddle.gather(x, paddle.gather(src, order))
    return (y, cw, scatter_index.astype("int32"), expert_offset.astype("int64"), expert_id.astype("int32"))


def grouped_gemm(x: paddle.Tensor, w: paddle.Tensor, counts: list[int]) -> tuple[paddle.Tensor]:
    """batched_gemm's contract: rows [sum(counts), K] in expert order times w [E, K, N], group e by w[e]; like the
    op, returns a one-tuple."""
    outs, start = [], 0
    for i, c in enumerate(counts):
        if c:
            outs.append(paddle.matmul(x[start:start + c], w[i]))
            start += c
    return (paddle.concat(outs),)


def combine(x: paddle.Tensor, weights: paddle.Tensor, scatter_index: paddle.Tensor) -> paddle.Tensor:
    """y[t] = Σ_k weights[t, k] · x[scatter_index[k, t]] (moe_combine's contract; [k, T] or flat k-major)."""
    assert scatter_index.dtype == paddle.int32, "moe_combine takes an int32 scatter_index"
    n, k = weights.shape
    index = scatter_index.astype("int64").reshape([k, n]).transpose([1, 0]).reshape([-1])
    rows = paddle.gather(x, index)  # [N*k, H]
    return (rows.reshape([n, k, -1]) * weights.unsqueeze(-1)).sum(axis=1)

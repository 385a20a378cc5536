"""ERNIE's routing and the CPU sorted-grouped expert pass: the one place the routing math is written.

Routing follows transformers' `Ernie4_5_MoeTopKRouter` to the letter, in three steps that every path composes:

    probs = router_probs(h, gate_weight)          # fp32 logits and softmax, [N, E]
    experts = select(probs, bias, k)              # top-k of probs + e_score_correction_bias (selection only)
    weights = mix_weights(probs, experts, norm_min)  # unbiased probs of the chosen, / clip(sum, moe_norm_min)
    weights, experts = route(h, gate_weight, bias, k, norm_min)   # the three in one

The Paddle model uses `route`; the GPU path (`kernels_gpu.fused_moe`) needs `probs` for the dispatch op and takes
`router_probs` + `mix_weights`; parity's "did the bias change the choice" is `select(probs, None, k)`; the
paddle2onnx flavour composes the same pieces. The expert pass sorts the (token, slot) pairs by expert and runs each
selected expert once on its contiguous slice: no per-token weight gathers, no loop over tokens.
"""

from __future__ import annotations

from typing import Callable

import paddle
import paddle.nn.functional as F


def router_probs(h: paddle.Tensor, gate_weight: paddle.Tensor) -> paddle.Tensor:
    """Softmax of the router logits in fp32 for tokens h [N, H] and gate [H, E]: probs [N, E] fp32."""
    h32 = h if h.dtype == paddle.float32 else h.astype("float32")
    w32 = gate_weight if gate_weight.dtype == paddle.float32 else gate_weight.astype("float32")
    return F.softmax(paddle.matmul(h32, w32), axis=-1)


def select(probs: paddle.Tensor, bias: paddle.Tensor | None, k: int) -> paddle.Tensor:
    """Expert ids [N, k] int64: the top k of probs + bias (bias None: plain top-k of the probabilities).

    The correction bias changes *which* experts are chosen, never their weights (see `mix_weights`)."""
    scores = probs + bias if bias is not None else probs
    return paddle.topk(scores, k, axis=-1)[1]


def mix_weights(probs: paddle.Tensor, experts: paddle.Tensor, norm_min: float) -> paddle.Tensor:
    """Mixing weights [N, k] fp32: the unbiased probabilities of the chosen experts, divided by
    clip(their sum, moe_norm_min)."""
    weights = paddle.take_along_axis(probs, experts, axis=-1)
    return weights / paddle.clip(weights.sum(axis=-1, keepdim=True), min=norm_min)


def route(h: paddle.Tensor, gate_weight: paddle.Tensor, bias: paddle.Tensor | None, k: int,
          norm_min: float) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Top-k expert choice for tokens `h` [N, H]; returns (weights [N, k] fp32, expert ids [N, k] int64)."""
    probs = router_probs(h, gate_weight)
    experts = select(probs, bias, k)
    return mix_weights(probs, experts, norm_min), experts


ExpertFn = Callable[[int, paddle.Tensor], paddle.Tensor]


def sorted_grouped(x: paddle.Tensor, weights: paddle.Tensor, experts: paddle.Tensor, num_experts: int,
                   expert_fn: ExpertFn) -> paddle.Tensor:
    """Σ_k weights[:, k] · Expert_{experts[:, k]}(x): (token, slot) pairs sorted by expert, one call per expert.

    x [N, H]; weights, experts [N, k]. One host sync (the per-expert counts).
    """
    n, k = experts.shape
    flat = experts.reshape([-1])  # [N*k]
    order = paddle.argsort(flat, stable=True)  # pair ids grouped by expert
    counts = paddle.bincount(flat, minlength=num_experts).tolist()
    xs = paddle.gather(x, order // k)  # [N*k, H] rows in expert order
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(expert_fn(e, xs[start:start + c]))
            start += c
    ys = paddle.concat(outs) if len(outs) > 1 else outs[0]
    ys = paddle.gather(ys, paddle.argsort(order))  # back to (token, slot) order
    return (ys.reshape([n, k, -1]) * weights.astype(ys.dtype).unsqueeze(-1)).sum(axis=1)


def mask_loop(x: paddle.Tensor, weights: paddle.Tensor, experts: paddle.Tensor, num_experts: int,
              expert_fn: ExpertFn) -> paddle.Tensor:
    """The per-expert mask loop (transformers' eager experts): a reference and the benchmark baseline."""
    out = paddle.zeros_like(x)
    hit = paddle.unique(experts).tolist()
    for e in hit:
        token, slot = paddle.nonzero(experts == e, as_tuple=True)
        token, slot = token.reshape([-1]), slot.reshape([-1])
        y = expert_fn(e, paddle.gather(x, token))
        w = paddle.gather_nd(weights, paddle.stack([token, slot], axis=-1)).astype(y.dtype)
        out = paddle.index_add(out, token, 0, y * w.unsqueeze(-1))
    return out


CPU_PASSES: dict[str, Callable] = {"sorted": sorted_grouped, "mask-loop": mask_loop}
FUSED = "fused"  # the GPU's dispatch + grouped GEMM + combine on stacked weights (`kernels_gpu.fused_moe`)
EXPERT_PASSES = (*CPU_PASSES, FUSED)
"""Every expert pass a `SparseMoeBlock` can run, the default first: sorted-grouped, the mask loop (a reference and
the benchmark baseline), the fused GPU pass."""

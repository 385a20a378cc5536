"""The parity report's reference: the Paddle model in fp32, traced on each sequence (logits, the residual stream
after every layer, the experts each MoE layer chose, and how often the correction bias changed that choice).

Both ways run the model's own forward pieces (`begin`, `Pass.through`, `head`): on the whole model when it fits in
memory, otherwise one decoder layer at a time, each read and checked when it is needed, so that the report runs on
the full 21B-A3B model where its fp32 weights do not fit.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np

from ernie_paddle.parity.report import Trace


def bias_changed(block, router_input, chosen: np.ndarray) -> float:
    """Share of tokens whose expert set the correction bias changed (plain top-k of the probs vs the choice)."""
    from ernie_paddle.paddle.moe import router_probs, select

    h = router_input.reshape([-1, router_input.shape[-1]])
    plain = select(router_probs(h, block.gate.weight), None, block.k).numpy()
    return float(np.mean([set(a) != set(b) for a, b in zip(plain, chosen)]))


@contextlib.contextmanager
def router_inputs(blocks) -> Iterator[list]:
    """Record each MoE block's input while the block runs (forward pre-hooks, removed on exit)."""
    captured: list = []
    handles = [b.register_forward_pre_hook(lambda layer, inputs: captured.append(inputs[0])) for b in blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _traces(model, layers: Iterable, seqs: list[list[int]]) -> tuple[list[Trace], list[list[float]]]:
    """Every sequence through `model`'s own forward pieces (`begin`, `Pass.through`, `head`), one decoder layer at a
    time for all of them; `layers` gives each layer of `model` in turn (its own, or each one streamed in)."""
    import paddle

    from ernie_paddle.paddle.modeling import SparseMoeBlock

    with paddle.no_grad():
        passes = [model.begin(np.array([s])) for s in seqs]
        traces = [Trace(None, [p.x.numpy()[0]], []) for p in passes]
        changed: list[list[float]] = [[] for _ in seqs]
        for layer in layers:
            moe = isinstance(layer.mlp, SparseMoeBlock)
            with router_inputs([layer.mlp] if moe else []) as captured:
                for p, trace, ch in zip(passes, traces, changed):
                    trace.hidden.append(p.through(layer).numpy()[0])
                    if moe:
                        chosen = layer.mlp.last_experts.numpy()
                        trace.experts.append(chosen)
                        ch.append(bias_changed(layer.mlp, captured[-1], chosen))
        for p, trace in zip(passes, traces):
            trace.hidden[-1] = model.norm(p.x).numpy()[0]  # compare the final normed state, as HF exposes it
            trace.logits = model.head(p.x).numpy()[0]
    return traces, changed


def paddle_trace_streaming(model_dir: str, cfg, seqs: list[list[int]]) -> tuple[list[Trace], list[list[float]]]:
    """The reference's traces computed one decoder layer at a time: memory holds the embedding, final norm, head
    and one decoder layer (a small share of the whole fp32 model at the 21B-A3B shape)."""
    from ernie_paddle.paddle.streaming import open_without_layers, streamed_layers

    model, reader = open_without_layers(model_dir, cfg)
    try:
        return _traces(model, streamed_layers(model, model_dir, reader), seqs)
    finally:
        reader.close()


def reference_traces(model_dir: str, cfg, seqs: list[list[int]], streaming: bool
                     ) -> tuple[list[Trace], list[list[float]]]:
    """The Paddle reference's trace of every sequence, and per sequence and MoE layer the bias-changed share."""
    if streaming:
        return paddle_trace_streaming(model_dir, cfg, seqs)
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    return _traces(model, model.layers, seqs)

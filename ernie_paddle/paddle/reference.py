"""The parity report's reference: the Paddle model in fp32, traced on each sequence (logits, the residual stream
after every layer, the experts each MoE layer chose, and how often the correction bias changed that choice).

The whole model when it fits in memory; otherwise one decoder layer at a time, reading each layer's weights when it
is needed (same math and modules), so the report runs on the full 21B-A3B model on a 24 GB machine.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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


def paddle_trace(model, ids: list[int]) -> tuple[Trace, list[float]]:
    """Paddle trace, and per MoE layer the share of tokens whose expert set the correction bias changed."""
    from ernie_paddle.paddle.modeling import SparseMoeBlock

    blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    with router_inputs(blocks) as captured:
        out = model(np.array([ids]), output_router=True, output_hidden_states=True)
    hidden = [h.numpy()[0] for h in out.hidden_states]
    hidden[-1] = model.norm(out.hidden_states[-1]).numpy()[0]  # compare the final normed state, as HF exposes it
    experts = [e.numpy() for e in out.router_experts]
    changed = [bias_changed(b, x, e) for b, x, e in zip(blocks, captured, experts)]
    return Trace(out.logits.numpy()[0], hidden, experts), changed


def _causal_inputs(cfg, seqs: list[list[int]]) -> list[tuple]:
    """Per sequence: the rotary angles of positions 0..T-1 and the additive causal mask [1, 1, T, T]."""
    import paddle

    from ernie_paddle.paddle.modeling import Rotary, attention_bias

    out = []
    for p in seqs:
        t = len(p)
        rotary = Rotary.at(paddle.to_tensor(np.arange(t, dtype=np.int64)[None]), cfg.head_dim, cfg.rope_theta)
        out.append((rotary, attention_bias(1, t, 0, None)))
    return out


def _load_layer(cfg, i: int, take):
    """Decoder layer `i` in fp32 with its weights taken by name from the checkpoint stream."""
    import paddle

    from ernie_paddle.paddle.modeling import DecoderLayer

    layer = DecoderLayer(cfg, i, "float32")
    for name, param in layer.named_parameters():
        param.set_value(paddle.to_tensor(take(f"layers.{i}.{name}")))
    return layer


def paddle_trace_streaming(model_dir: str, cfg, seqs: list[list[int]]) -> tuple[list[Trace], list[list[float]]]:
    """`paddle_trace` for every sequence, computed one decoder layer at a time.

    Holds the embedding and one layer in memory (about 4 GB in fp32 at the 21B-A3B shape instead of 87 GB).
    Tensors are taken from the checkpoint by canonical name, not by position in the stream.
    """
    import paddle

    from ernie_paddle.checkpoint.folder import TensorStream, read_canonical
    from ernie_paddle.paddle.modeling import RMSNorm, SparseMoeBlock

    take = TensorStream((m.canonical, a) for m, a in read_canonical(model_dir, cfg)).take
    embed = take("embed_tokens.weight")
    xs = [paddle.to_tensor(embed[np.asarray(p)])[None] for p in seqs]  # [1, T, H] each
    traces = [Trace(None, [x.numpy()[0]], []) for x in xs]
    changed: list[list[float]] = [[] for _ in seqs]
    inputs = _causal_inputs(cfg, seqs)
    with paddle.no_grad():
        for i in range(cfg.num_hidden_layers):
            layer = _load_layer(cfg, i, take)
            moe = isinstance(layer.mlp, SparseMoeBlock)
            with router_inputs([layer.mlp] if moe else []) as captured:
                for j, (rotary, mask) in enumerate(inputs):
                    xs[j] = layer(xs[j], rotary, mask, None, 0, padded=False)
                    traces[j].hidden.append(xs[j].numpy()[0])
                    if moe:
                        chosen = layer.mlp.last_experts.numpy()
                        traces[j].experts.append(chosen)
                        changed[j].append(bias_changed(layer.mlp, captured[-1], chosen))
            del layer
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "float32")
        norm.weight.set_value(paddle.to_tensor(take("norm.weight")))
        head = embed.T if cfg.tie_word_embeddings else take("lm_head.weight")
        for j, x in enumerate(xs):
            normed = norm(x).numpy()[0]
            traces[j].hidden[-1] = normed
            traces[j].logits = (normed @ head).astype(np.float32)
    return traces, changed


def reference_traces(model_dir: str, cfg, seqs: list[list[int]], streaming: bool
                     ) -> tuple[list[Trace], list[list[float]]]:
    """The Paddle reference's trace of every sequence, and per sequence and MoE layer the bias-changed share."""
    if streaming:
        return paddle_trace_streaming(model_dir, cfg, seqs)
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    traces, changed = [], []
    for s in seqs:
        t, ch = paddle_trace(model, s)
        traces.append(t)
        changed.append(ch)
    return traces, changed

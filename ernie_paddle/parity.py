"""Cross-framework parity report: Paddle (the reference) against exported ONNX folders and transformers.

For each candidate, on the same prompts: per-layer hidden-state max and mean |diff| (where the candidate exposes
them), router agreement per MoE layer (share of tokens whose selected expert set is identical) and how often the
correction bias changed Paddle's choice, logits max |diff|, KL(Paddle || candidate), top-1 agreement, and the
length of the identical greedy continuation. `ernie-paddle parity` prints it, writes JSON and a drift plot.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from . import _runtime  # noqa: F401  (thread / MKL settings before Paddle is imported below)
from .generation import GenerationConfig, generate


@dataclass
class Trace:
    """What one implementation computed for one prompt."""

    logits: np.ndarray  # [T, V] float32
    hidden: list[np.ndarray | None] = field(default_factory=list)  # after embedding, then after each layer
    experts: list[np.ndarray] = field(default_factory=list)  # per MoE layer [T, k]


# ---- the reference ------------------------------------------------------------------------------------------
def _bias_changed(block, router_input, chosen: np.ndarray) -> float:
    """Share of tokens whose expert set the correction bias changed (plain top-k of the probs vs the choice)."""
    import paddle

    h = router_input.reshape([-1, router_input.shape[-1]])
    probs = paddle.nn.functional.softmax(paddle.matmul(h.astype("float32"), block.gate.weight), axis=-1).numpy()
    plain = np.argsort(-probs, axis=-1, kind="stable")[:, :block.k]
    return float(np.mean([set(a) != set(b) for a, b in zip(plain, chosen)]))


def _capture_router_inputs(blocks) -> tuple[list, list]:
    """Forward pre-hooks recording each MoE block's input; returns (captured inputs, hook handles)."""
    captured, handles = [], []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda layer, inputs: captured.append(inputs[0])))
    return captured, handles


def paddle_trace(model, ids: list[int]) -> tuple[Trace, list[float]]:
    """Paddle trace, and per MoE layer the share of tokens whose expert set the correction bias changed."""
    from .modeling import SparseMoeBlock

    blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    captured, handles = _capture_router_inputs(blocks)
    try:
        out = model(np.array([ids]), output_router=True, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = [h.numpy()[0] for h in out.hidden_states]
    hidden[-1] = model.norm(out.hidden_states[-1]).numpy()[0]  # compare the final normed state, as HF exposes it
    experts = [e.numpy() for e in out.router_experts]
    changed = [_bias_changed(b, x, e) for b, x, e in zip(blocks, captured, experts)]
    return Trace(out.logits.numpy()[0], hidden, experts), changed


# ---- candidates -------------------------------------------------------------------------------------------------
class OnnxProbe:
    """An exported folder with its per-layer residual stream and router choices exposed as extra outputs."""

    def __init__(self, folder: str, cfg):
        import onnx

        from .onnx_runtime import OnnxCausalLM, load_manifest

        self.folder, self.cfg = folder, cfg
        manifest = load_manifest(folder)
        self.name = f"onnx:{os.path.basename(os.path.normpath(folder))} ({manifest['flavor']} {manifest['precision']})"
        model = onnx.load(os.path.join(folder, manifest.get("model_file", "model.onnx")), load_external_data=False)
        nodes = {n.name: n for n in model.graph.node}
        self.hidden_names: list[str | None] = [None] * (cfg.num_hidden_layers + 1)
        self.router_names: list[tuple[str, str]] = []
        if manifest["flavor"] == "ort":
            for i in range(cfg.num_hidden_layers):
                nxt = nodes.get(f"layers.{i + 1}.input_layernorm") or nodes.get("norm")
                self.hidden_names[i + 1] = nxt.output[3] if nxt is not None and len(nxt.output) > 3 else None
            self.hidden_names[-1] = nodes["norm"].output[0] if "norm" in nodes else None
            emb = nodes.get("embed_tokens")
            self.hidden_names[0] = emb.output[0] if emb is not None else None
            for i in range(cfg.num_hidden_layers):
                n = nodes.get(f"layers.{i}.mlp.experts")
                if n is not None:
                    self.router_names.append((n.op_type, n.input[1]))
        extra = [x for x in self.hidden_names if x] + [r for _, r in self.router_names]
        for name in extra:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        fd, probe_path = tempfile.mkstemp(prefix=".parity-", suffix=".onnx", dir=folder)
        os.close(fd)
        try:
            onnx.save(model, probe_path)  # same external data file, referenced relatively
            # one session serves both the traces and generation: the weights are loaded once
            self.runtime = OnnxCausalLM(folder, model_file=probe_path)
        finally:
            os.remove(probe_path)
        self.session = self.runtime.session

    def trace(self, ids: list[int]) -> Trace:
        cfg = self.cfg
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "position_ids" in [i.name for i in self.session.get_inputs()]:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        kv_dtype = self.runtime.kv_dtype
        for i in range(cfg.num_hidden_layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), kv_dtype)
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(None, feeds)))
        hidden = [outs[n].reshape(len(ids), -1).astype(np.float32) if n else None for n in self.hidden_names]
        experts = []
        for _, name in self.router_names:  # MoE: log-probs of the chosen, -inf elsewhere; QMoE: p + bias
            r = outs[name].astype(np.float32)
            experts.append(np.argsort(-r, axis=-1, kind="stable")[:, :cfg.moe_k])
        return Trace(outs["logits"][0].astype(np.float32), hidden, experts)



class HFProbe:
    """transformers' implementation (eager attention and experts, fp32), from a -PT checkpoint folder."""

    def __init__(self, pt_dir: str):
        import torch
        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=torch.float32, attn_implementation="eager")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(pt_dir, experts_implementation="eager", **kwargs)
        except (TypeError, ValueError):
            self.model = AutoModelForCausalLM.from_pretrained(pt_dir, **kwargs)
        self.model.eval()
        self.torch = torch
        self.name = "transformers " + __import__("transformers").__version__
        self._router: list = []
        for _, module in self.model.named_modules():
            if type(module).__name__.endswith("TopKRouter"):
                module.register_forward_hook(lambda m, i, o: self._router.append(o[2]))

    def trace(self, ids: list[int]) -> Trace:
        self._router.clear()
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), output_hidden_states=True)
        hidden = [h[0].float().numpy() for h in out.hidden_states]
        return Trace(out.logits[0].float().numpy(), hidden, [r.numpy() for r in self._router])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        with self.torch.no_grad():
            for _ in range(n):
                seq.append(int(self.model(self.torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(ids):]


# ---- comparison -------------------------------------------------------------------------------------------------
def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return max(0.0, float((np.exp(lp) * (lp - lq)).sum(-1).mean()))  # >= 0 up to rounding


def compare_traces(ref: list[Trace], cand: list[Trace]) -> dict:
    layers = len(ref[0].hidden)
    hmax, hmean = [], []
    for i in range(layers):
        pairs = [(r.hidden[i], c.hidden[i]) for r, c in zip(ref, cand) if i < len(c.hidden) and c.hidden[i] is not None]
        hmax.append(max(float(np.abs(a - b).max()) for a, b in pairs) if pairs else None)
        hmean.append(float(np.mean([np.abs(a - b).mean() for a, b in pairs])) if pairs else None)
    router = []
    for j in range(len(ref[0].experts)):
        same = total = 0
        for r, c in zip(ref, cand):
            if j < len(c.experts):
                same += sum(set(a) == set(b) for a, b in zip(r.experts[j], c.experts[j]))
                total += len(r.experts[j])
        router.append(same / total if total else None)
    logits = [(r.logits, c.logits) for r, c in zip(ref, cand)]
    return {
        "hidden_max_abs_diff": hmax, "hidden_mean_abs_diff": hmean, "router_agreement": router,
        "logits_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in logits),
        "kl_divergence": float(np.mean([_kl(a, b) for a, b in logits])),
        "top1_agreement": float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in logits]))),
    }


def greedy_match(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def paddle_trace_streaming(model_dir: str, cfg, seqs: list[list[int]]) -> tuple[list[Trace], list[list[float]]]:
    """The Paddle reference computed one decoder layer at a time, reading each layer's weights when it is needed.

    Holds the embedding and one layer in memory (about 4 GB in fp32 at the 21B-A3B shape instead of 87 GB), so the
    report runs on the full model on a 24 GB machine. Same math and modules as `Ernie4_5_MoeForCausalLM`.
    """
    import paddle

    from .checkpoint import read_canonical
    from .modeling import DecoderLayer, RMSNorm, Rotary, SparseMoeBlock

    tensors = read_canonical(model_dir, cfg)
    _, embed = next(tensors)
    xs = [paddle.to_tensor(embed[np.asarray(p)])[None] for p in seqs]  # [1, T, H] each
    traces = [Trace(None, [x.numpy()[0]], []) for x in xs]
    changed = [[] for _ in seqs]
    rots, masks = [], []
    for p in seqs:
        t = len(p)
        pos = paddle.to_tensor(np.arange(t, dtype=np.int64)[None])
        rots.append(Rotary.at(pos, cfg.head_dim, cfg.rope_theta))
        allowed = np.tril(np.ones((t, t), bool))
        masks.append(paddle.to_tensor(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))[None, None])
    with paddle.no_grad():
        for i in range(cfg.num_hidden_layers):
            layer = DecoderLayer(cfg, i, "float32")
            params = dict(layer.named_parameters())
            prefix = f"layers.{i}."
            for _ in range(len(params)):
                m, a = next(tensors)
                params[m.canonical[len(prefix):]].set_value(paddle.to_tensor(a))
            moe = isinstance(layer.mlp, SparseMoeBlock)
            captured, _ = _capture_router_inputs([layer.mlp] if moe else [])
            for j in range(len(seqs)):
                xs[j] = layer(xs[j], rots[j], masks[j], None, 0, padded=False)
                traces[j].hidden.append(xs[j].numpy()[0])
                if moe:
                    chosen = layer.mlp.last_experts.numpy()
                    traces[j].experts.append(chosen)
                    changed[j].append(_bias_changed(layer.mlp, captured[-1], chosen))
            del layer, params
        _, norm_w = next(tensors)
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "float32")
        norm.weight.set_value(paddle.to_tensor(norm_w))
        head = embed.T if cfg.tie_word_embeddings else next(tensors)[1]
        for j, x in enumerate(xs):
            normed = norm(x).numpy()[0]
            traces[j].hidden[-1] = normed
            traces[j].logits = (normed @ head).astype(np.float32)
    return traces, changed


def _teacher_forced_match(ref_logits: np.ndarray, prompt_len: int, continuation: list[int]) -> int:
    """How many of `continuation` the reference would have produced greedily (logits of prompt + continuation)."""
    pred = ref_logits[prompt_len - 1:prompt_len - 1 + len(continuation)].argmax(-1)
    return greedy_match(pred.tolist(), continuation)


def run(model_dir: str, onnx_dirs: list[str], use_hf: bool, prompts: list[list[int]], greedy_tokens: int = 32,
        log=lambda s: None, streaming: bool | None = None) -> dict:
    """The whole report as a dict (see module docstring).

    `streaming` (default: when the fp32 model would not fit in memory) computes the Paddle reference layer by
    layer; the candidates then run first and the reference checks their greedy continuations teacher-forced.
    """
    import gc

    from .config import ErnieConfig
    from .memory import fp32_bytes
    from .sysinfo import available_memory

    cfg = ErnieConfig.from_file(model_dir)
    if streaming is None:
        streaming = fp32_bytes(cfg) > 0.5 * available_memory()
    gen = GenerationConfig(max_new_tokens=greedy_tokens, eos_token_ids=[])
    report = {"model": os.path.abspath(model_dir), "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
              "greedy_tokens": greedy_tokens, "reference": "paddle fp32, layer by layer" if streaming else "paddle fp32",
              "moe_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)], "candidates": []}
    if streaming:
        if use_hf:
            raise ValueError("--hf needs the whole fp32 model in memory; it is too large here (drop --hf)")
        runs = []
        for folder in onnx_dirs:
            log(f"parity: {folder}")
            probe = OnnxProbe(folder, cfg)
            runs.append((probe.name, [probe.trace(p) for p in prompts],
                         [generate(probe.runtime, p, gen) for p in prompts]))
            del probe
            gc.collect()
        log("parity: Paddle reference, layer by layer")
        seqs = list(prompts) + [p + g for _, _, greedy in runs for p, g in zip(prompts, greedy)]
        traces, changed = paddle_trace_streaming(model_dir, cfg, seqs)
        ref, extra = traces[:len(prompts)], traces[len(prompts):]
        report["bias_changed_choice"] = [float(np.mean(x)) for x in zip(*changed[:len(prompts)])]
        for c, (name, cand, greedy) in enumerate(runs):
            row = {"name": name, **compare_traces(ref, cand)}
            row["greedy_identical_tokens"] = [
                _teacher_forced_match(extra[c * len(prompts) + k].logits, len(p), g)
                for k, (p, g) in enumerate(zip(prompts, greedy))]
            report["candidates"].append(row)
        return report

    from .modeling import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    ref, changed = [], []
    for p in prompts:
        t, ch = paddle_trace(model, p)
        ref.append(t)
        changed.append(ch)
    ref_greedy = [generate(model, p, gen) for p in prompts]
    report["bias_changed_choice"] = [float(np.mean(x)) for x in zip(*changed)] if changed and changed[0] else []
    for folder in onnx_dirs:
        log(f"parity: {folder}")
        probe = OnnxProbe(folder, cfg)
        cand = [probe.trace(p) for p in prompts]
        row = {"name": probe.name, **compare_traces(ref, cand)}
        row["greedy_identical_tokens"] = [greedy_match(a, generate(probe.runtime, p, gen))
                                          for a, p in zip(ref_greedy, prompts)]
        report["candidates"].append(row)
    if use_hf:
        log("parity: transformers")
        pt_dir = _as_pt(model_dir)
        probe = HFProbe(pt_dir)
        cand = [probe.trace(p) for p in prompts]
        row = {"name": probe.name, **compare_traces(ref, cand)}
        row["greedy_identical_tokens"] = [greedy_match(a, probe.greedy(p, greedy_tokens))
                                          for a, p in zip(ref_greedy, prompts)]
        report["candidates"].append(row)
    return report


def _as_pt(model_dir: str) -> str:
    """A -PT copy of a -Paddle checkpoint (fp32) for transformers; -PT folders are used as they are."""
    from .layout import PADDLE, detect_layout
    from .safetensors_io import CheckpointReader

    r = CheckpointReader(model_dir)
    layout = detect_layout(r.names(), model_dir)
    r.close()
    if layout != PADDLE:
        return model_dir
    from .checkpoint import convert

    out = os.path.join(tempfile.mkdtemp(prefix="ernie-parity-"), "pt")
    convert(model_dir, out, layout="pt", dtype="float32")
    return out


def format_table(report: dict) -> str:
    lines = [f"Parity against Paddle ({report['prompts']} prompts, {sum(report['prompt_tokens'])} tokens; "
             f"correction bias changed the expert set for "
             + ", ".join(f"{x:.1%}" for x in report["bias_changed_choice"]) + " of tokens per MoE layer)"]
    head = ["candidate", "logits max|d|", "KL", "top-1", "greedy same", "worst layer max|d|", "router agree (min)"]
    lines.append(" | ".join(head))
    lines.append(" | ".join("---" for _ in head))
    for c in report["candidates"]:
        h = [x for x in c["hidden_max_abs_diff"] if x is not None]
        r = [x for x in c["router_agreement"] if x is not None]
        lines.append(" | ".join([c["name"], f"{c['logits_max_abs_diff']:.2e}", f"{c['kl_divergence']:.2e}",
                                 f"{c['top1_agreement']:.3f}",
                                 "/".join(str(x) for x in c["greedy_identical_tokens"]) + f" of {report['greedy_tokens']}",
                                 f"{max(h):.2e}" if h else "n/a", f"{min(r):.3f}" if r else "n/a"]))
    for c in report["candidates"]:
        lines.append(f"\n{c['name']}: per layer max |diff| (embedding first, final norm last)")
        lines.append("  " + " ".join("n/a" if x is None else f"{x:.1e}" for x in c["hidden_max_abs_diff"]))
        if c["router_agreement"]:
            lines.append("  router agreement per MoE layer: " + " ".join(
                "n/a" if x is None else f"{x:.3f}" for x in c["router_agreement"]))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for c in report["candidates"]:
        ys = c["hidden_max_abs_diff"]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [max(ys[i], 1e-12) for i in xs], marker="o", label=c["name"])
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embedding, last = final norm)")
    ax.set_ylabel("max |hidden diff| vs Paddle")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""The parity report's figures and how they are shown: what each implementation computed (`Trace`), the comparison
of a candidate's traces with the reference's, the table printed by `ernie-paddle parity`, and its drift plot.

Numpy only (the plot needs matplotlib); the traces come from `paddle.reference` and `parity.probes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ernie_paddle.atomic import write_png
from ernie_paddle.scoring import kl_divergence


@dataclass
class Trace:
    """What one implementation computed for one prompt."""

    logits: np.ndarray | None  # [T, V] float32
    hidden: list[np.ndarray | None] = field(default_factory=list)  # after embedding, then after each layer
    experts: list[np.ndarray] = field(default_factory=list)  # per MoE layer [T, k]


def _hidden_drift(ref: list[Trace], cand: list[Trace]) -> tuple[list[float | None], list[float | None]]:
    """Per layer, max and mean |diff| of the hidden states (None where the candidate does not expose them)."""
    hmax, hmean = [], []
    for i in range(len(ref[0].hidden)):
        pairs = [(r.hidden[i], c.hidden[i]) for r, c in zip(ref, cand) if i < len(c.hidden) and c.hidden[i] is not None]
        hmax.append(max(float(np.abs(a - b).max()) for a, b in pairs) if pairs else None)
        hmean.append(float(np.mean([np.abs(a - b).mean() for a, b in pairs])) if pairs else None)
    return hmax, hmean


def _router_agreement(ref: list[Trace], cand: list[Trace]) -> list[float | None]:
    """Per MoE layer, the share of tokens whose selected expert set is identical (None: not exposed)."""
    router = []
    for j in range(len(ref[0].experts)):
        same = total = 0
        for r, c in zip(ref, cand):
            if j < len(c.experts):
                same += sum(set(a) == set(b) for a, b in zip(r.experts[j], c.experts[j]))
                total += len(r.experts[j])
        router.append(same / total if total else None)
    return router


def compare_traces(ref: list[Trace], cand: list[Trace]) -> dict:
    """Hidden-state drift per layer, router agreement per MoE layer, logits max |diff| and relative RMS error, KL and
    top-1 agreement."""
    hmax, hmean = _hidden_drift(ref, cand)
    logits = [(r.logits, c.logits) for r, c in zip(ref, cand)]
    ref_all = np.concatenate([a.reshape(-1) for a, _ in logits]).astype(np.float64)
    diff_all = np.concatenate([(a - b).reshape(-1) for a, b in logits]).astype(np.float64)
    return {
        "hidden_max_abs_diff": hmax, "hidden_mean_abs_diff": hmean, "router_agreement": _router_agreement(ref, cand),
        "logits_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in logits),
        # every logit's error at once, over the reference's size: a scale-free figure that one outlier cannot set
        "logits_relative_rms": float(np.sqrt(np.mean(diff_all ** 2) / np.mean(ref_all ** 2))),
        "kl_divergence": float(np.mean([kl_divergence(a, b) for a, b in logits])),
        "top1_agreement": float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in logits]))),
    }


def format_table(report: dict) -> str:
    """The report as the text `ernie-paddle parity` prints: one row per candidate, then per-layer drift."""
    lines = [f"Parity against Paddle ({report['prompts']} prompts, {sum(report['prompt_tokens'])} tokens; "
             f"correction bias changed the expert set for "
             + ", ".join(f"{x:.1%}" for x in report["bias_changed_choice"]) + " of tokens per MoE layer)"]
    head = ["candidate", "logits max|d|", "logits rel. RMS", "KL", "top-1", "greedy same", "worst layer max|d|", "router agree (min)"]
    lines.append(" | ".join(head))
    lines.append(" | ".join("---" for _ in head))
    for c in report["candidates"]:
        h = [x for x in c["hidden_max_abs_diff"] if x is not None]
        r = [x for x in c["router_agreement"] if x is not None]
        greedy = "/".join(str(x) for x in c["greedy_identical_tokens"]) + f" of {report['greedy_tokens']}"
        lines.append(" | ".join([c["name"], f"{c['logits_max_abs_diff']:.2e}", f"{c['logits_relative_rms']:.2e}",
                                 f"{c['kl_divergence']:.2e}",
                                 f"{c['top1_agreement']:.3f}", greedy, f"{max(h):.2e}" if h else "n/a",
                                 f"{min(r):.3f}" if r else "n/a"]))
    for c in report["candidates"]:
        lines.append(f"\n{c['name']}: per layer max |diff| (embedding first, final norm last)")
        lines.append("  " + " ".join("n/a" if x is None else f"{x:.1e}" for x in c["hidden_max_abs_diff"]))
        if c["router_agreement"]:
            lines.append("  router agreement per MoE layer: " + " ".join(
                "n/a" if x is None else f"{x:.3f}" for x in c["router_agreement"]))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """A PNG of each candidate's per-layer max |hidden diff| (log scale), written all or nothing."""
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
    write_png(fig, path)

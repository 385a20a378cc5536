"""ONNX Runtime's quantised CPU kernels at ERNIE-4.5-21B-A3B's widths, one weight layout at a time: one layer's routed
experts (QMoE: 64 experts, top 6) and each dense projection (MatMulNBits: packed QKV, o_proj, the shared experts'
up/gate and down, the LM head), at each bit width, block size and accuracy level the export can write.

For each layout, in its own process: the time of one decode call (a token; each call routes differently) and of
one prefill call (`--prompt` tokens), the bytes the layout stores and reads per token, the resident bytes once the
session has loaded (and MLAS has repacked) them, and the read rate and multiply-accumulate rate the times imply.
A layout a CPU kernel refuses is a row with the kernel's error. Weights are random codes (a kernel's speed does not
depend on their values). A program, not a test: which layouts make decode faster on this CPU is what it measures.

    python -m ernie_paddle.tools.kernel_bench --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
from onnx import TensorProto

from ernie_paddle.atomic import write_json
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.cli.args import positive_int
from ernie_paddle.errors import InputError
from ernie_paddle.interrupts import run_command
from ernie_paddle.sysinfo import proc_kib

DECODE_INPUTS = 32  # distinct decode inputs cycled through: a QMoE call routes each to other experts


class Layout(NamedTuple):
    """A weight layout: the op, its matrix (`what`), bits, block (0: QMoE per output channel) and accuracy level;
    `fc2_bits` (QMoE) differs from `bits` for a mixed-width layout."""

    op: str  # "QMoE" | "MatMulNBits"
    what: str
    bits: int
    block: int
    accuracy: int
    fc2_bits: int = 0

    @property
    def label(self) -> str:
        width = f"int{self.bits}" + (f"/fc2 int{self.fc2_bits}" if self.fc2_bits else "")
        return f"{self.op} {self.what} {width} " + (f"b{self.block}" if self.block else "per-channel") + \
            f" acc{self.accuracy}"


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """(K in, N out) of each dense projection a decoded token runs at this config."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"qkv": (h, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d),
            "o_proj": (cfg.num_attention_heads * d, h), "shared up_gate": (h, 2 * cfg.shared_intermediate_size),
            "shared down": (cfg.shared_intermediate_size, h), "lm_head": (h, cfg.vocab_size)}


def default_layouts() -> list[Layout]:
    """The candidates: the export's int4 at blocks 32-128 and both accuracy levels, int8 and int2, and the QMoE
    widths the schema offers beyond them (3 bits, fc2 at 8 bits)."""
    q = [Layout("QMoE", "experts", b, blk, acc) for b, blk, acc in
         ((4, 32, 4), (4, 64, 4), (4, 128, 4), (4, 32, 0), (8, 0, 4), (2, 32, 4), (2, 128, 4), (3, 32, 4))]
    q.append(Layout("QMoE", "experts", 4, 64, 4, fc2_bits=8))
    m = [Layout("MatMulNBits", w, b, blk, acc) for w in ("qkv", "o_proj", "shared up_gate", "shared down", "lm_head")
         for b, blk, acc in ((4, 32, 4), (4, 64, 4), (4, 128, 4), (8, 32, 4))]
    m += [Layout("MatMulNBits", "lm_head", b, blk, acc) for b, blk, acc in ((4, 32, 0), (2, 32, 4), (2, 128, 4))]
    return q + m


# ---- one layout's graph -------------------------------------------------------------------------------------------
def build(layout: Layout, cfg, path: str, rng) -> tuple[int, int]:
    """Write the layout's one-node graph at `path` (random codes, scales in the export's dtypes); returns (K, N) of
    its input and output."""
    from ernie_paddle.export.graph import MS, GraphBuilder, data_file_for
    from ernie_paddle.export.ort_graph import moe_attributes

    data_path, data_name = data_file_for(path)
    g = GraphBuilder(data_path, data_name)
    try:
        if layout.op == "QMoE":
            h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts

            def fc(name: str, n: int, k: int, bits: int) -> tuple[str, str]:
                codes = rng.integers(0, 256, (e, n, k * bits // 8), dtype=np.uint8)
                scale_shape = (e, n, k // layout.block) if layout.block else (e, n)
                scales = (rng.random(scale_shape, dtype=np.float32) * 1e-2).astype(np.float16)
                return g.weight(name, codes), g.weight(name + ".scales", scales)

            w1, s1 = fc("fc1", 2 * i, h, layout.bits)
            w2, s2 = fc("fc2", h, i, layout.fc2_bits or layout.bits)
            x = g.input("x", TensorProto.FLOAT, ["T", h])
            p = g.input("p", TensorProto.FLOAT, ["T", e])
            attrs = dict(expert_weight_bits=layout.bits, accuracy_level=layout.accuracy, normalize_routing_weights=1,
                         **moe_attributes(cfg.moe_k))
            if layout.block:
                attrs["block_size"] = layout.block
            if layout.fc2_bits:
                attrs["fc2_expert_weight_bits"] = layout.fc2_bits
            if 3 in (layout.bits, layout.fc2_bits):  # the schema takes 3-bit experts only as raw weights
                attrs["weights_prepacked"] = 0
            y = g.op("QMoE", [x, p, w1, s1, "", w2, s2, "", "", "", "", "", "", "", p], domain=MS, **attrs)
            k, n = h, h
        else:
            k, n = shapes(cfg)[layout.what]
            blocks = k // layout.block
            codes = g.weight("b", rng.integers(0, 256, (n, blocks, layout.block * layout.bits // 8), dtype=np.uint8))
            scales = g.weight("s", rng.random(n * blocks, dtype=np.float32) * 1e-2)
            x = g.input("x", TensorProto.FLOAT, ["T", k])
            y = g.op("MatMulNBits", [x, codes, scales], domain=MS, K=k, N=n, bits=layout.bits,
                     block_size=layout.block, accuracy_level=layout.accuracy)
        g.output(y, "y", TensorProto.FLOAT, ["T", n])
        g.save(path, "kernel_bench")
    finally:
        g.close()
    return k, n


def macs_per_token(layout: Layout, cfg) -> int:
    """Multiply-accumulates one token costs in the layout's op (QMoE: its k experts' fc1 and fc2)."""
    if layout.op == "QMoE":
        return cfg.moe_k * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    k, n = shapes(cfg)[layout.what]
    return k * n


def measure(layout: Layout, cfg, prompt: int, repeats: int, threads: int) -> dict:
    """One layout's row, in this process: times, bytes and rates (see the module's docstring)."""
    import onnxruntime as ort

    from ernie_paddle.benchmarking.weight_bytes import onnx_token_bytes

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="kernel-bench-") as tmp:
        k, n = build(layout, cfg, os.path.join(tmp, "model.onnx"), rng)
        tb = onnx_token_bytes(tmp)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        before = proc_kib("/proc/self/status", "VmRSS")
        sess = ort.InferenceSession(os.path.join(tmp, "model.onnx"), so, providers=["CPUExecutionProvider"])
        resident = proc_kib("/proc/self/status", "VmRSS") - before

        def feeds(tokens: int) -> dict:
            f = {"x": rng.standard_normal((tokens, k), dtype=np.float32)}
            if layout.op == "QMoE":
                f["p"] = rng.random((tokens, cfg.moe_num_experts), dtype=np.float32)
            return f

        decode = [feeds(1) for _ in range(DECODE_INPUTS)]
        for f in decode[:4]:
            sess.run(None, f)
        times = []
        for _ in range(repeats):
            for f in decode:
                t = time.perf_counter()
                sess.run(None, f)
                times.append(time.perf_counter() - t)
        decode_s = float(np.median(times))
        big = feeds(prompt)
        sess.run(None, big)
        prefill_s = float("inf")
        for _ in range(max(2, repeats // 2)):
            t = time.perf_counter()
            sess.run(None, big)
            prefill_s = min(prefill_s, time.perf_counter() - t)
    read = tb.packed_per_token or tb.per_token
    macs = macs_per_token(layout, cfg)
    return {"layout": layout._asdict(), "label": layout.label, "k": k, "n": n,
            "stored_mb_per_token": round(tb.per_token / 1e6, 2), "read_mb_per_token": round(read / 1e6, 2),
            "stored_mb": round(tb.stored / 1e6, 1), "resident_mb": round(resident / 1e6, 1),
            "decode_ms": _sig(decode_s * 1e3), "decode_gb_per_s": _sig(read / decode_s / 1e9),
            "decode_gmac_per_s": _sig(macs / decode_s / 1e9), "prefill_tokens": prompt,
            "prefill_ms": _sig(prefill_s * 1e3), "prefill_gmac_per_s": _sig(prompt * macs / prefill_s / 1e9)}


def _sig(x: float) -> float:
    """Three significant figures: what a timing on a shared machine resolves, at any scale."""
    return float(f"{x:.3g}")


# ---- the program ----------------------------------------------------------------------------------------------------
def _table(rows: list[dict]) -> str:
    head = ["layout", "stored MB/token", "read MB/token", "resident MB", "decode ms", "decode GB/s",
            "decode GMAC/s", "prefill ms", "prefill GMAC/s"]
    keys = ["stored_mb_per_token", "read_mb_per_token", "resident_mb", "decode_ms", "decode_gb_per_s",
            "decode_gmac_per_s", "prefill_ms", "prefill_gmac_per_s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(" | ".join([r["label"], f"refused: {r['error']}"] + [""] * (len(head) - 2)))
        else:
            lines.append(" | ".join([r["label"]] + [str(r[k]) for k in keys]))
    return "\n".join(lines)


def _kernel_error(stderr: str) -> str:
    """The kernel's own sentence from a failed child's traceback (its last line), without the exception's class."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    return last.split(" : ")[-1].strip()[:200]


def main(argv: list[str] | None = None) -> int:
    from ernie_paddle.benchmarking.setups import log, run_meta
    from ernie_paddle.config import PRESETS, preset

    p = argparse.ArgumentParser(prog="python -m ernie_paddle.tools.kernel_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="21b-a3b", choices=list(PRESETS), help="the config giving the widths")
    p.add_argument("--prompt", type=positive_int, default=512, help="tokens of the prefill call (default 512)")
    p.add_argument("--repeats", type=positive_int, default=3, help="passes over the decode inputs (default 3)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--only", default=None,
                   help="comma-separated texts: measure only the layouts whose label contains one of them")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one layout, as JSON
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    if args.run:
        print(json.dumps(measure(Layout(**json.loads(args.run)), cfg, args.prompt, args.repeats, args.threads)))
        return 0
    wanted = [w for w in (args.only or "").split(",") if w]
    layouts = [x for x in default_layouts() if not wanted or any(w in x.label for w in wanted)]
    if not layouts:
        raise InputError(f"--only {args.only!r} matches no layout; labels look like "
                         f"{default_layouts()[0].label!r}")
    meta = run_meta(args.preset, cfg, args.threads, prompt=args.prompt, repeats=args.repeats)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for x in layouts:
        log(f"kernel_bench: {x.label}")
        try:
            rows.append(json_from_child("ernie_paddle.tools.kernel_bench",
                                        ["--preset", args.preset, "--prompt", str(args.prompt), "--repeats",
                                         str(args.repeats), "--threads", str(args.threads), "--run",
                                         json.dumps(x._asdict())], env=env))
        except ChildFailed as e:
            rows.append({"layout": x._asdict(), "label": x.label, "error": _kernel_error(e.stderr)})
    print(_table(rows))
    if args.json:
        write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "python -m ernie_paddle.tools.kernel_bench"))

"""One layer's attention under ONNX Runtime at ERNIE-4.5-21B-A3B's shape (20 query heads, 4 KV heads, head_dim 128):
decode with the fused GroupQueryAttention op (fp32 cache, int8 cache) against the same attention in standard ops
that reads each KV head once per group, and the fused op's prefill chunks on either cache (time, peak memory).

The grouped form stacks a group's 5 query heads as rows of one FusedMatMul against the group's keys. Its cache is
token-major, [max_len, kv_heads, head_dim], so the first P slots are one contiguous block that IOBinding binds by
pointer (no copy of the cache); FusedMatMul's transBatchB reads each KV head's [P, head_dim] rows at a stride. The
new token's key and value enter as one extra score column and one extra term, under one softmax.

    python -m ernie_paddle.tools.attention_bench --context 512,4096,8192,32768 --json attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Callable, NamedTuple

import numpy as np
from onnx import TensorProto

from ernie_paddle import graph_contract as contract
from ernie_paddle.cli.args import positive_int, positive_int_list
from ernie_paddle.interrupts import run_command
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.sysinfo import peak_rss
from ernie_paddle.tools.context_bench import fastest

FORMS = ("gqa-fp32", "gqa-int8", "grouped-fp32")
PREFILL_FORMS = ("gqa-fp32", "gqa-int8")  # the fused op on each cache the export offers
BYTES = {"gqa-fp32": 4, "gqa-int8": 1, "grouped-fp32": 4}  # bytes of one cached K or V element
INT8_SCALE = 0.04  # per-channel scale of the int8 cache: codes up to +-5, beyond the random values drawn


class Shape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_bytes(self, context: int, form: str) -> int:
        """Bytes of keys and values for `context` slots: what one decode step must read at least once."""
        return 2 * self.kv_heads * context * self.head_dim * BYTES[form]


ERNIE_21B = Shape(20, 4, 128)
ERNIE_21B_LAYERS = 28


def prompt_attention_s(chunk: int, context: int, last_chunk_s: float, layers: int) -> float:
    """Attention's share of a `context`-token prompt's prefill in `chunk`-token chunks, from the last chunk's time: a
    chunk's attention grows linearly with the slots its queries read, on average (i + 1/2) chunks for chunk i, so n
    chunks cost sum(i + 1/2) = n^2 / 2 times a chunk, and the last one (n - 1/2) of them."""
    n = -(-context // chunk)
    return layers * last_chunk_s * n * n / (2 * n - 1)


# ---- graphs ----------------------------------------------------------------------------------------------------------
def _save(build: Callable, path: str) -> str:
    """Build a one-layer graph with the project's GraphBuilder and save it at `path`."""
    from ernie_paddle.export.graph import GraphBuilder, data_file_for

    data_path, data_name = data_file_for(path)
    g = GraphBuilder(data_path, data_name)
    try:
        build(g)
        g.save(path, "attention_bench")
    finally:
        g.close()
    return path


def gqa_graph(shape: Shape, path: str, int8: bool = False) -> str:
    """GroupQueryAttention as the `ort` export builds it (separate q/k/v, shared past/present buffers named as the
    export names them); `int8` rewrites it with export/kv_cache.py's quantised cache and constant scales."""
    from ernie_paddle.export.graph import MS

    nh, nkv, d = shape

    def build(g):
        q = g.input("query", TensorProto.FLOAT, [1, "S", nh * d])
        k = g.input("key", TensorProto.FLOAT, [1, "S", nkv * d])
        v = g.input("value", TensorProto.FLOAT, [1, "S", nkv * d])
        cache = [1, nkv, "max_len", d]
        past = [g.input(contract.past(0, kv), TensorProto.FLOAT, cache) for kv in contract.KV]
        seqlens = g.input("seqlens_k", TensorProto.INT32, [1])
        total = g.input("total_sequence_length", TensorProto.INT32, [])
        out, pk, pv = g.op("GroupQueryAttention", [q, k, v, *past, seqlens, total], n_out=3, domain=MS,
                           name="layers.0.self_attn", num_heads=nh, kv_num_heads=nkv, scale=float(d ** -0.5))
        g.output(out, "attn", TensorProto.FLOAT, [1, "S", nh * d])
        for value, kv in zip((pk, pv), contract.KV):
            g.output(value, contract.present(0, kv), TensorProto.FLOAT, cache)

    _save(build, path)
    if int8:
        from ernie_paddle.export.kv_cache import quantize_cache

        scales = np.full(nkv * d, INT8_SCALE, np.float32)
        quantize_cache(path, [(scales, scales.copy())], path)
    return path


def grouped_graph(shape: Shape, path: str) -> str:
    """Decode attention in standard ops over a token-major cache prefix [P, kv_heads, d]: per KV head, its group's
    query rows [G, d] against its P keys (one batched FusedMatMul), plus the new token's score; one softmax; the
    weights against the P values plus the new value's term."""
    from ernie_paddle.export.graph import MS

    nh, nkv, d = shape

    def build(g):
        q = g.input("query", TensorProto.FLOAT, [1, 1, nh * d])
        k = g.input("key", TensorProto.FLOAT, [1, 1, nkv * d])
        v = g.input("value", TensorProto.FLOAT, [1, 1, nkv * d])
        pk = g.input("past_key", TensorProto.FLOAT, ["P", nkv, d])
        pv = g.input("past_value", TensorProto.FLOAT, ["P", nkv, d])
        rows = g.op("Reshape", [q, g.const([nkv, nh // nkv, d])])  # query head h is in group h // G, as in GQA
        k_new = g.op("Reshape", [k, g.const([1, nkv, d])])
        v_new = g.op("Reshape", [v, g.const([nkv, 1, d])])
        scale = float(d ** -0.5)
        s_past = g.op("FusedMatMul", [rows, pk], domain=MS, transB=1, transBatchB=1, alpha=scale)  # [nkv, G, P]
        s_new = g.op("FusedMatMul", [rows, k_new], domain=MS, transB=1, transBatchB=1, alpha=scale)  # [nkv, G, 1]
        probs = g.op("Softmax", [g.op("Concat", [s_past, s_new], axis=-1)], axis=-1)
        split = g.op("Concat", [g.op("Shape", [pk], end=1), g.const([1])], axis=0)
        p_past, p_new = g.op("Split", [probs, split], n_out=2, axis=-1)
        o = g.op("Add", [g.op("FusedMatMul", [p_past, pv], domain=MS, transBatchB=1), g.op("Mul", [p_new, v_new])])
        g.output(g.op("Reshape", [o, g.const([1, 1, nh * d])]), "attn", TensorProto.FLOAT, [1, 1, nh * d])

    return _save(build, path)


def session(path: str, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# ---- runners: one call = one layer's attention step --------------------------------------------------------------
def random_cache(shape: Shape, max_len: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values [kv_heads, max_len, d] of about unit size (rotated keys and values of a real model)."""
    return tuple(rng.standard_normal((shape.kv_heads, max_len, shape.head_dim), dtype=np.float32) for _ in "kv")


class FusedStep:
    """GroupQueryAttention over one preallocated cache bound as both past and present (as the runtime binds it)."""

    def __init__(self, sess, keys: np.ndarray, values: np.ndarray, int8: bool):
        import onnxruntime as ort

        self.sess = sess
        if int8:  # the codes the quantised cache would hold for these values
            keys, values = (np.clip(np.rint(a / INT8_SCALE), -127, 127).astype(np.int8) for a in (keys, values))
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a[None])) for a in (keys, values)]

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int) -> np.ndarray:
        b = self.sess.io_binding()
        for name, x in (("query", q), ("key", k), ("value", v)):
            b.bind_cpu_input(name, x)
        b.bind_cpu_input("seqlens_k", np.array([past + q.shape[1] - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(past + q.shape[1], np.int32))
        b.bind_output("attn", "cpu")  # first: get_outputs() follows the binding order
        for kv, buf in zip(contract.KV, self.cache):
            b.bind_ortvalue_input(contract.past(0, kv), buf)
            b.bind_ortvalue_output(contract.present(0, kv), buf)
        self.sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()


class GroupedStep:
    """The grouped standard-op graph over token-major caches; the first `past` slots are bound by pointer."""

    def __init__(self, sess, keys: np.ndarray, values: np.ndarray):
        self.sess = sess
        self.cache = [np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (keys, values)]  # [max_len, nkv, d]

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int) -> np.ndarray:
        b = self.sess.io_binding()
        for name, x in (("query", q), ("key", k), ("value", v)):
            b.bind_cpu_input(name, x)
        for name, buf in zip(("past_key", "past_value"), self.cache):
            b.bind_input(name, "cpu", 0, np.float32, [past, *buf.shape[1:]], buf.ctypes.data)
        b.bind_output("attn", "cpu")
        self.sess.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()


def decode_steps(shape: Shape, max_len: int, threads: int | None, workdir: str, rng) -> dict[str, Callable]:
    """The three decode forms over the same random cache of `max_len` slots, keyed by FORMS."""
    keys, values = random_cache(shape, max_len, rng)
    fp32 = session(gqa_graph(shape, os.path.join(workdir, "gqa_fp32.onnx")), threads)
    int8 = session(gqa_graph(shape, os.path.join(workdir, "gqa_int8.onnx"), int8=True), threads)
    grouped = session(grouped_graph(shape, os.path.join(workdir, "grouped.onnx")), threads)
    return {"gqa-fp32": FusedStep(fp32, keys, values, False), "gqa-int8": FusedStep(int8, keys, values, True),
            "grouped-fp32": GroupedStep(grouped, keys, values)}


def step_inputs(shape: Shape, rng, tokens: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nh, nkv, d = shape
    return tuple(rng.standard_normal((1, tokens, n * d), dtype=np.float32) for n in (nh, nkv, nkv))


# ---- measurements ------------------------------------------------------------------------------------------------
def measure_decode(shape: Shape, contexts: list[int], threads: int | None, repeats: int) -> list[dict]:
    """Per context and form: ms per layer-step and the KV bytes (read once) per second."""
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for context in contexts:
            steps = decode_steps(shape, context, threads, workdir, rng)
            q, k, v = step_inputs(shape, rng)
            for form, step in steps.items():
                step(q, k, v, context - 1)  # warm-up: the first run of a session pays one-time costs
                s = fastest(lambda: step(q, k, v, context - 1), repeats)[0]
                rows.append({"context": context, "form": form, "ms": round(s * 1e3, 3),
                             "gb_s": round(shape.kv_bytes(context, form) / s / 1e9, 2)})
    return rows


def reset_peak_rss() -> None:
    """Start this process's peak RSS afresh (Linux: /proc/self/clear_refs), so a run's rise is its own and not hidden
    under the peak of building its inputs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's own since its start


def measure_prefill(shape: Shape, form: str, chunk: int, context: int, threads: int | None, repeats: int,
                    layers: int = ERNIE_21B_LAYERS) -> dict:
    """The fused op (`form`: gqa-fp32 or gqa-int8) on one chunk of `chunk` queries ending at slot `context` (this
    process's peak RSS is the run's: call it in a fresh process)."""
    int8 = form == "gqa-int8"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as workdir:
        keys, values = random_cache(shape, context, rng)
        graph = gqa_graph(shape, os.path.join(workdir, "gqa.onnx"), int8=int8)
        step = FusedStep(session(graph, threads), keys, values, int8)
        del keys, values
        q, k, v = step_inputs(shape, rng, chunk)
        reset_peak_rss()
        before = peak_rss()
        s = fastest(lambda: step(q, k, v, context - chunk), repeats)[0]
    probs = 4 * shape.heads * chunk * context  # the [B, heads, S, T] fp32 probabilities, were they materialised
    return {"form": form, "chunk": chunk, "context": context, "ms": round(s * 1e3, 2),
            "ms_per_token": round(s * 1e3 / chunk, 3),
            "prompt_attention_s": round(prompt_attention_s(chunk, context, s, layers), 1),
            "peak_rss_gib": round(peak_rss() / 2**30, 3),
            "peak_rise_gib": round((peak_rss() - before) / 2**30, 3), "probs_matrix_gib": round(probs / 2**30, 3)}


def prefill_in_child(shape: Shape, form: str, chunk: int, context: int, threads: int | None, repeats: int,
                     layers: int) -> dict:
    """measure_prefill in a fresh process, so each row's peak RSS is its own."""
    args = ["--one-prefill", f"{chunk},{context}", "--prefill-form", form, "--heads", str(shape.heads), "--kv-heads",
            str(shape.kv_heads), "--head-dim", str(shape.head_dim), "--repeats", str(repeats), "--layers",
            str(layers)] + (["--threads", str(threads)] if threads else [])
    try:
        return json_from_child("ernie_paddle.tools.attention_bench", args)
    except ChildFailed as e:
        raise RuntimeError(f"{form} prefill chunk {chunk} at context {context} failed: {e.stderr.strip()}") from None


# ---- command line --------------------------------------------------------------------------------------------------
def _print_decode(rows: list[dict], contexts: list[int]) -> None:
    by = {(r["context"], r["form"]): r for r in rows}
    print("| context | " + " | ".join(f"{f} ms | {f} GB/s" for f in FORMS) + " |")
    print("|---:|" + "---:|" * (2 * len(FORMS)))
    for n in contexts:
        print(f"| {n} | " + " | ".join(f"{by[n, f]['ms']} | {by[n, f]['gb_s']}" for f in FORMS) + " |", flush=True)


def _print_prefill(rows: list[dict]) -> None:
    print("\n| form | chunk | context | ms | ms/token | whole-prompt attention s | peak RSS GiB | peak rise GiB | "
          "probs matrix GiB (if materialised) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['form']} | {r['chunk']} | {r['context']} | {r['ms']} | {r['ms_per_token']} | "
              f"{r['prompt_attention_s']} | {r['peak_rss_gib']} | {r['peak_rise_gib']} | {r['probs_matrix_gib']} |",
              flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", default=[512, 4096, 8192, 32768], type=positive_int_list,
                   help="decode context lengths (default 512,4096,8192,32768)")
    p.add_argument("--prefill-chunks", default=[64, 512, 2048], type=positive_int_list,
                   help="prefill chunk sizes (default 64,512,2048)")
    p.add_argument("--prefill-context", default=[4096, 32768], type=positive_int_list,
                   help="cache lengths the prefill chunks end at (default 4096,32768)")
    p.add_argument("--no-prefill", action="store_true", help="decode rows only")
    p.add_argument("--heads", type=positive_int, default=ERNIE_21B.heads)
    p.add_argument("--kv-heads", type=positive_int, default=ERNIE_21B.kv_heads)
    p.add_argument("--head-dim", type=positive_int, default=ERNIE_21B.head_dim)
    p.add_argument("--layers", type=positive_int, default=ERNIE_21B_LAYERS,
                   help="layers in the whole-prompt attention estimate (default 28)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--repeats", type=positive_int, default=5, help="keep the fastest of this many runs")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--one-prefill", default=None, type=positive_int_list, help=argparse.SUPPRESS)  # child: chunk,ctx
    p.add_argument("--prefill-form", default=PREFILL_FORMS[0], choices=PREFILL_FORMS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    shape = Shape(args.heads, args.kv_heads, args.head_dim)
    if shape.heads % shape.kv_heads:
        p.error(f"argument --heads: {shape.heads} is not a multiple of --kv-heads {shape.kv_heads}")
    if shape.head_dim % 16:
        p.error(f"argument --head-dim: GroupQueryAttention needs a multiple of 16, got {shape.head_dim}")
    if args.one_prefill:
        print(json.dumps(measure_prefill(shape, args.prefill_form, *args.one_prefill, args.threads, args.repeats,
                                         args.layers)))
        return 0
    bad = [(c, n) for c in args.prefill_chunks for n in args.prefill_context if c > n]
    if bad and not args.no_prefill:
        p.error(f"argument --prefill-chunks: chunk {bad[0][0]} exceeds --prefill-context {bad[0][1]}")
    decode = measure_decode(shape, args.context, args.threads, args.repeats)
    _print_decode(decode, args.context)
    prefill = [] if args.no_prefill else [prefill_in_child(shape, f, c, n, args.threads, args.repeats, args.layers)
                                          for f in PREFILL_FORMS for n in args.prefill_context
                                          for c in args.prefill_chunks]
    if prefill:
        _print_prefill(prefill)
    if args.json:
        from ernie_paddle.atomic import write_json

        from ernie_paddle.benchmarking.setups import machine_meta

        meta = machine_meta(args.threads or os.cpu_count() or 1, shape=shape._asdict(), layers=args.layers,
                            repeats=args.repeats)
        write_json(args.json, {"meta": meta, "decode": decode, "prefill": prefill})
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "attention_bench"))

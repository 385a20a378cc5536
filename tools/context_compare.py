"""ONNX Runtime against llama.cpp at long contexts, side by side on the same weights: decode tokens/s, time to first
token and peak RSS at each context, with ratios measured in the same run.

Each (engine, context) is one `context_bench` child process, taken context by context so that slow drift of the
machine touches every engine alike:

    python -m ernie_paddle.tools.context_compare --ort e21b-int4-kvfp32 e21b-int4-kvint8 --gguf e21b-q4_0.gguf \\
        --llama-kv-cache f16,q8_0 --context 512,4096,8192,32768 --json ctx.json --plot ctx.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

from ernie_paddle.atomic import write_json, write_png
from ernie_paddle.benchmarking.charts import subplots
from ernie_paddle.cli.args import positive_int, positive_int_list
from ernie_paddle.interrupts import run_command
from ernie_paddle.benchmarking.child import ChildFailed
from ernie_paddle.tools.context_bench import LLAMA_KV_CACHES, row_in_child


class Run(NamedTuple):
    """One engine configuration: its label, and what selects it in `context_bench` (engine, model, llama.cpp's
    cache type)."""

    label: str
    engine: str  # ort or llama
    model: str
    kv_cache: str | None = None

    @property
    def llama(self) -> bool:
        return self.engine == "llama"


def ort_run(folder: str) -> Run:
    """An exported folder, labelled by its manifest (precision, block, KV cache)."""
    from ernie_paddle import graph_contract as contract
    from ernie_paddle.ort.runtime import load_manifest

    m = load_manifest(folder)
    block = f" b{m[contract.BLOCK_SIZE]}" if m.get(contract.BLOCK_SIZE) else ""
    return Run(f"ort {m[contract.PRECISION]}{block}, {m.get(contract.KV_CACHE) or 'fp32'} cache", "ort", folder)


def llama_run(gguf: str, kv_cache: str) -> Run:
    quant = os.path.basename(gguf).rsplit(".", 1)[0].rsplit("-", 1)[-1].upper()
    return Run(f"llama.cpp {quant}, {kv_cache} cache", "llama", gguf, kv_cache)


def measure(run: Run, context: int, chunk: int, decode: int, threads: int | None) -> dict:
    """One `context_bench` row for `run` at `context`, measured in its own process; a failure becomes an error row."""
    try:
        row = row_in_child(run.engine, run.model, context, chunk=chunk, decode=decode, threads=threads,
                           kv_cache=run.kv_cache)
    except ChildFailed as e:
        return {"label": run.label, "context": context, "error": (e.stderr.strip() or "failed")[-300:]}
    return {"label": run.label, **row}  # row["engine"]: ort or llama


def tables(rows: list[dict], runs: list[Run], contexts: list[int]) -> str:
    """Decode tok/s, time to first token and peak RSS per context and engine, and each ONNX Runtime configuration's
    ratio to llama.cpp's default cache (the first llama run)."""
    by = {(r["label"], r["context"]): r for r in rows if "error" not in r}
    base = next((run.label for run in runs if run.llama), None)
    ours = [run.label for run in runs if not run.llama]
    out = []
    for key, title, better in (("decode_tok_s", "decode tokens/s", max), ("ttft_estimate_s", "time to first token s", min),
                               ("peak_rss_gib", "peak RSS GiB", min)):
        ratio_cols = [f"{o} / {base}" for o in ours] if base and key != "peak_rss_gib" else []
        out.append(f"{title}\n\n| context | " + " | ".join([run.label for run in runs] + ratio_cols) + " |")
        out.append("|---:|" + "---:|" * (len(runs) + len(ratio_cols)))
        for n in contexts:
            vals = [by.get((run.label, n), {}).get(key) for run in runs]
            cells = ["—" if v is None else f"{v:g}" for v in vals]
            for o in ours if ratio_cols else []:
                a, b = by.get((o, n), {}).get(key), by.get((base, n), {}).get(key)
                # decode: ours / theirs; time to first token: theirs / ours, so > 1 always means we are ahead
                r = None if not (a and b) else (a / b if better is max else b / a)
                cells.append("—" if r is None else f"{r:.2f}x")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], runs: list[Run], path: str) -> bool:
    """Decode tok/s and time to first token against context, one line per engine (log-scale context)."""
    made = subplots("context_compare", 1, 2, figsize=(11, 4))
    if made is None:
        return False
    fig, (left, right) = made
    for run in runs:
        mine = sorted((r for r in rows if r["label"] == run.label and "error" not in r), key=lambda r: r["context"])
        style = "--" if run.llama else "-"
        xs = [r["context"] for r in mine]
        left.plot(xs, [r["decode_tok_s"] for r in mine], style, marker="o", label=run.label)
        right.plot(xs, [r["ttft_estimate_s"] for r in mine], style, marker="o", label=run.label)
    for ax, ylabel in ((left, "decode tokens / s"), (right, "time to first token, s (estimate)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if all(r["ttft_estimate_s"] > 0 for r in rows if "error" not in r):  # times span minutes to an hour
        right.set_yscale("log")
    left.legend(fontsize=8)
    write_png(fig, path)
    return True


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ort", nargs="*", default=[], metavar="DIR", help="exported folders (ernie-paddle export)")
    p.add_argument("--gguf", default=None, help="the same weights as a GGUF file, for llama.cpp")
    p.add_argument("--llama-kv-cache", default=list(LLAMA_KV_CACHES), type=lambda s: s.split(","),
                   help="llama.cpp KV cache types, comma-separated (default f16,q8_0; f16 is llama.cpp's default)")
    p.add_argument("--context", default=[512, 4096, 8192, 32768], type=positive_int_list,
                   help="comma-separated context lengths (default 512,4096,8192,32768)")
    p.add_argument("--chunk", type=positive_int, default=512, help="prefill chunk, both engines (default 512)")
    p.add_argument("--decode", type=positive_int, default=8, help="decode steps timed at each context (default 8)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", default=None, help="write the rows and tables as JSON")
    p.add_argument("--plot", default=None, help="write a PNG of decode speed and time to first token")
    args = p.parse_args(argv)
    if not args.ort and not args.gguf:
        p.error("give --ort DIR and/or --gguf FILE")
    for d in args.ort:
        if not os.path.isdir(d):
            p.error(f"argument --ort: {d!r} is not a folder")
    if args.gguf and not os.path.isfile(args.gguf):
        p.error(f"argument --gguf: {args.gguf!r} is not a file")
    bad = [t for t in args.llama_kv_cache if t not in LLAMA_KV_CACHES]
    if bad:
        p.error(f"argument --llama-kv-cache: {bad[0]!r} is not one of {', '.join(LLAMA_KV_CACHES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runs = [ort_run(d) for d in args.ort]
    runs += [llama_run(args.gguf, t) for t in args.llama_kv_cache] if args.gguf else []
    rows = []
    for n in args.context:
        for run in runs:
            row = measure(run, n, args.chunk, args.decode, args.threads)
            rows.append(row)
            print(f"context {n:>6}  {run.label:<28} " + (f"error: {row['error']}" if "error" in row else
                  f"decode {row['decode_tok_s']:g} tok/s, TTFT {row['ttft_estimate_s']:g} s, "
                  f"RSS {row['peak_rss_gib']:g} GiB"), flush=True)
    text = tables(rows, runs, args.context)
    print("\n" + text)
    if args.json:
        from ernie_paddle.benchmarking.setups import machine_meta

        meta = machine_meta(args.threads or os.cpu_count() or 1, chunk=args.chunk, decode=args.decode,
                            runs=[r._asdict() for r in runs])
        write_json(args.json, {"meta": meta, "results": rows})
    if args.plot:
        plot(rows, runs, args.plot)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "context_compare"))

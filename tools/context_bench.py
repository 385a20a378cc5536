"""Long-context cost of an exported folder under ONNX Runtime: time to first token, decode tokens/s and peak RSS.

A real 32K-token prefill of the 21B-A3B model takes over an hour on 2 cores, so for each context length N this
program measures, in a fresh process: one prefill chunk at the start of the window and one at its end (the cache
holding N - chunk slots of random keys/values), then `--decode` steps at context N. A chunk's cost grows linearly
with the slots it attends to, so the full chunked prefill takes about n_chunks x (first + last) / 2: the estimated
time to first token. `--full` also runs the real prefill, to check that estimate.

`--engine llama` measures a GGUF file the same way under llama.cpp (llama-cpp-python): the cache before the last
chunk is the first chunk's cells repeated to N - chunk (tools/llama_state), since llama.cpp's cost depends on how
many cells are occupied, not on their values. `--kv-cache q8_0` quantises its cache (with flash attention, which
llama.cpp needs for a quantised V; f16 keeps llama-cpp-python's default, flash attention off).

    python -m ernie_paddle.tools.context_bench --model ernie-21b-int4 --context 8192,32768 --json ctx.json
    python -m ernie_paddle.tools.context_bench --engine llama --model ernie-21b-q4_0.gguf --kv-cache q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import numpy as np

from ernie_paddle.cli.args import positive_int, positive_int_list
from ernie_paddle.interrupts import run_command
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.sysinfo import peak_rss
from ernie_paddle.benchmarking import llama_state


def ttft_estimate(context: int, chunk: int, first_s: float, last_s: float) -> float:
    """Time to first token of a `context`-token prompt prefilled in chunks: a chunk's cost grows linearly with the
    slots it attends to, so the chunks average the first and the last one's time."""
    n_chunks = -(-context // chunk)
    return n_chunks * (first_s + last_s) / 2


def fastest(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The least wall time of `repeats` calls of `run()` (the least disturbed by other work), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t)
    return best, out


def _chunk_times(model, ids, mask, context: int, chunk: int, decode: int, repeats: int, rng):
    """Times of the first prefill chunk and of the last (the cache holding context - chunk random slots), and the
    cache and output after the last one."""
    cfg = model.config
    cache = model.allocate_cache(1, context + decode)

    def first_chunk():
        cache.length = 0
        return model(ids[:, :chunk], attention_mask=mask[:, :chunk], cache=cache, last_only=True)

    first, _ = fastest(first_chunk, repeats)
    # the cache as a long prompt leaves it: random keys/values in every slot before the last chunk
    shape = (1, cfg.num_key_value_heads, context + decode, cfg.head_dim)
    for k, v in cache.layers:
        for buf in (k, v):
            values = rng.integers(-100, 101, shape) if model.kv_dtype == np.int8 else rng.standard_normal(shape) * 0.5
            buf.update_inplace(values.astype(model.kv_dtype))

    def last_chunk():
        cache.length = context - chunk
        return model(ids[:, context - chunk:context], attention_mask=mask[:, :context], cache=cache, last_only=True)

    last, out = fastest(last_chunk, repeats)
    return first, last, cache, out


def _chunk_row(context: int, chunk: int, load_s: float, first: float, last: float) -> dict:
    """The row's prefill figures, the same for every engine."""
    return {"context": context, "chunk": chunk, "load_s": round(load_s, 2), "first_chunk_s": round(first, 3),
            "last_chunk_s": round(last, 3), "ttft_estimate_s": round(ttft_estimate(context, chunk, first, last), 3)}


def measure(folder: str, context: int, chunk: int, decode: int, threads: int | None, full: bool,
            repeats: int = 1) -> dict:
    """One context length, in this process (its peak RSS is the run's); each prefill timing is the fastest of
    `repeats`."""
    from ernie_paddle.generation import prefill
    from ernie_paddle.ort.runtime import OnnxCausalLM
    t0 = time.perf_counter()
    model = OnnxCausalLM(folder, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (1, context + decode))
    mask = np.ones((1, context + decode), np.int64)
    model(ids[:, :8])  # warm-up: the first run of a session pays one-time costs
    first, last, cache, out = _chunk_times(model, ids, mask, context, chunk, decode, repeats, rng)
    row = {"engine": "ort", "kv_cache": np.dtype(model.kv_dtype).name,
           **_chunk_row(context, chunk, load_s, first, last)}
    token = out.logits[:, -1].argmax(-1)[:, None]
    t = time.perf_counter()
    for i in range(decode):
        out = model(token, attention_mask=mask[:, :context + i + 1], cache=cache, last_only=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
    row["decode_tok_s"] = round(decode / (time.perf_counter() - t), 3)
    if full:
        cache = model.allocate_cache(1, context)

        def whole_prefill():
            cache.length = 0
            return prefill(model, ids[:, :context], mask[:, :context], np.arange(context)[None], cache, chunk)

        row["ttft_measured_s"] = round(fastest(whole_prefill, repeats)[0], 3)
    row["peak_rss_gib"] = round(peak_rss() / 2**30, 3)
    return row


LLAMA_KV_CACHES = ("f16", "q8_0")  # --kv-cache: llama.cpp's cache types (ids in llama_state.TYPE_IDS); f16 its default


def llama_flash_attn(kv_cache: str) -> bool:
    """Flash attention only where llama.cpp needs it: a quantised V cache."""
    return kv_cache != "f16"


def _llama(path: str, n_ctx: int, chunk: int, threads: int | None, kv_cache: str):
    """A llama.cpp context that decodes `chunk` tokens per call (n_batch = n_ubatch = chunk), logits of the last
    position only, as tools/bench.py drives it; flash attention only where the cache needs it (a quantised V)."""
    import llama_cpp

    from ernie_paddle.errors import InputError

    threads = threads or os.cpu_count()  # llama-cpp-python's own default is half the cores
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=chunk, n_ubatch=chunk, n_threads=threads,
                               n_threads_batch=threads, logits_all=False, flash_attn=llama_flash_attn(kv_cache),
                               type_k=llama_state.TYPE_IDS[kv_cache], type_v=llama_state.TYPE_IDS[kv_cache],
                               verbose=False)
    except ValueError as e:  # llama-cpp-python's one message for every refusal; llama.cpp logs the reason
        raise InputError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens with a {kv_cache} KV cache "
                         f"({e}; a q8_0 cache needs a head_dim divisible by 32)") from None


def measure_llama(path: str, context: int, chunk: int, decode: int, threads: int | None, full: bool,
                  repeats: int = 1, kv_cache: str = "f16") -> dict:
    """`measure` for a GGUF file under llama.cpp. The cache before the last chunk holds the first chunk's cells
    repeated to context - chunk (llama_state.load): what a chunk or a step costs depends on how many cells are
    occupied, not on their values."""
    from ernie_paddle.tools.bench import llama_logits


    t0 = time.perf_counter()
    llm = _llama(path, context + decode, chunk, threads, kv_cache)
    load_s = time.perf_counter() - t0
    ids = [int(t) for t in np.random.default_rng(0).integers(3, llm.n_vocab(), context + decode)]
    llm.eval(ids[:8])  # warm-up, as for ort

    def run(start: int, tokens: list[int]) -> None:
        llm.n_tokens = start  # eval drops the cells from here on, then decodes `tokens` at positions start...
        llm.eval(tokens)

    first, _ = fastest(lambda: run(0, ids[:chunk]), repeats)
    if context > chunk:
        llama_state.load(llm.ctx, llama_state.read(llm.ctx), context - chunk)
    last, _ = fastest(lambda: run(context - chunk, ids[context - chunk:context]), repeats)
    row = {"engine": "llama", "kv_cache": kv_cache, "flash_attn": llama_flash_attn(kv_cache),
           **_chunk_row(context, chunk, load_s, first, last)}

    def greedy() -> int:
        return int(llama_logits(llm).argmax())

    token = greedy()
    t = time.perf_counter()
    for i in range(decode):
        run(context + i, [token])
        token = greedy()
    row["decode_tok_s"] = round(decode / (time.perf_counter() - t), 3)
    if full:
        row["ttft_measured_s"] = round(fastest(lambda: run(0, ids[:context]), repeats)[0], 3)
    row["peak_rss_gib"] = round(peak_rss() / 2**30, 3)
    return row


def row_in_child(engine: str, model: str, context: int, *, chunk: int, decode: int, threads: int | None = None,
                 full: bool = False, repeats: int = 1, kv_cache: str | None = None) -> dict:
    """One context's row (`measure` or `measure_llama`) in a fresh process, so that its peak RSS is its own; a child
    that fails raises child.ChildFailed."""
    args = ["--one", "--engine", engine, "--model", model, "--context", str(context), "--chunk", str(chunk),
            "--decode", str(decode), "--repeats", str(repeats)]
    args += (["--threads", str(threads)] if threads else []) + (["--full"] if full else [])
    args += ["--kv-cache", kv_cache] if kv_cache else []
    return json_from_child("ernie_paddle.tools.context_bench", args)


def _gguf_context_length(p: argparse.ArgumentParser, path: str) -> int:
    """The training context of a GGUF file (its `<arch>.context_length`), or a refusal naming --model."""
    if not os.path.isfile(path):
        p.error(f"argument --model: {path} is not a GGUF file (--engine llama)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            p.error(f"argument --model: {path} is not a GGUF file (--engine llama)")
    import gguf

    fields = gguf.GGUFReader(path).fields
    return int(fields[f"{fields['general.architecture'].contents()}.context_length"].contents())


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contexts the model cannot hold and options its engine does not take, before any model is loaded."""
    from ernie_paddle.config import ErnieConfig
    from ernie_paddle.errors import ErnieError

    if args.engine == "ort" and args.kv_cache:
        p.error("argument --kv-cache: only for --engine llama (an exported folder's cache is set at export)")
    if args.engine == "llama":
        max_positions = _gguf_context_length(p, args.model)
    else:
        try:
            max_positions = ErnieConfig.from_file(args.model).max_position_embeddings
        except ErnieError as e:
            p.error(f"argument --model: {e}")
    for n in args.context:
        if n + args.decode > max_positions:
            p.error(f"--context {n} + --decode {args.decode} exceeds max_position_embeddings {max_positions}")
        if n < args.chunk:
            p.error(f"argument --context: {n} is shorter than --chunk {args.chunk}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported folder (ernie-paddle export), or a GGUF file for llama")
    p.add_argument("--engine", choices=("ort", "llama"), default="ort",
                   help="ort: ONNX Runtime on an exported folder; llama: llama.cpp (llama-cpp-python) on a GGUF file")
    p.add_argument("--kv-cache", choices=LLAMA_KV_CACHES, default=None,
                   help="llama.cpp's K/V cache type (default f16; q8_0 turns flash attention on)")
    p.add_argument("--context", default=[8192, 32768], type=positive_int_list,
                   help="comma-separated context lengths (default 8192,32768)")
    p.add_argument("--chunk", type=positive_int, default=512, help="prefill chunk (as --prefill-chunk)")
    p.add_argument("--decode", type=positive_int, default=16, help="decode steps timed at each context")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--full", action="store_true", help="also time the real chunked prefill (slow)")
    p.add_argument("--repeats", type=positive_int, default=1, help="time each prefill this many times, keep the fastest")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one context
    args = p.parse_args(argv)
    _check(p, args)
    if args.one:
        if args.engine == "llama":
            row = measure_llama(args.model, args.context[0], args.chunk, args.decode, args.threads, args.full,
                                args.repeats, args.kv_cache or "f16")
        else:
            row = measure(args.model, args.context[0], args.chunk, args.decode, args.threads, args.full, args.repeats)
        print(json.dumps(row))
        return 0
    rows = []
    print("| context | load s | first chunk s | last chunk s | TTFT estimate s | TTFT measured s | decode tok/s | "
          "peak RSS GiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in args.context:
        try:
            row = row_in_child(args.engine, args.model, n, chunk=args.chunk, decode=args.decode, threads=args.threads,
                               full=args.full, repeats=args.repeats, kv_cache=args.kv_cache)
        except ChildFailed as e:
            sys.stderr.write(e.stderr)
            return e.returncode
        rows.append(row)
        print(f"| {n} | {row['load_s']} | {row['first_chunk_s']} | {row['last_chunk_s']} | {row['ttft_estimate_s']} | "
              f"{row.get('ttft_measured_s', '—')} | {row['decode_tok_s']} | {row['peak_rss_gib']} |", flush=True)
    if args.json:
        from ernie_paddle.atomic import write_json

        from ernie_paddle.benchmarking.setups import machine_meta

        meta = machine_meta(args.threads or os.cpu_count() or 1, model=os.path.abspath(args.model),
                            engine=args.engine)
        write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "context_bench"))

"""Benchmark ERNIE-4.5 engines on the same weights: Paddle eager, ONNX Runtime (portable / ort fp32 / int8 /
int4), onnxruntime-genai on the int4 folder, transformers eager (torch), and llama.cpp through llama-cpp-python
(GGUF F16 / Q8_0 / Q4_0, and Q4_K_M made by llama.cpp's own quantizer) when installed.

For each engine, in its own process (so peak RSS is that engine's): prefill tokens/s at each prompt length,
time to first token, decode tokens/s at each batch size. Prints a table with every engine's ratio to Paddle
eager and to llama.cpp Q4_0 and Q4_K_M, writes JSON and (with matplotlib) a PNG chart. A program, not a test.
The ONNX folders take the export options (--block-size, --accuracy-level, --kv-cache, --block-scales,
--attention-precision; non-default ones are in the folder's name), which the JSON records with each row's folder,
so any row can be reproduced.

    python -m ernie_paddle.tools.bench --preset mid --json bench.json --plot bench.png
    ernie-paddle bench --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ernie_paddle.atomic import write_json, write_png
from ernie_paddle.benchmarking.charts import subplots
from ernie_paddle.cli.args import block_size, non_negative_int, positive_int, positive_int_list
from ernie_paddle.generation import logits_numpy
from ernie_paddle.interrupts import run_command
from ernie_paddle.benchmarking.setups import (ALL_CPU_ENGINES, SETUPS, ExportOptions, from_random_tensors,
                                              gguf_source, log, measure_in_child, name_list, prepare, run_meta)
from ernie_paddle.precisions import BITS, DEFAULT_BLOCK_SIZE, DEFAULT_SCALE_RULE, KV_CACHES, SCALE_RULES
from ernie_paddle.sysinfo import peak_rss

GPU_ENGINES = ("paddle-gpu", "ort-cuda-fp16")  # Paddle bf16 with the fused kernels; ONNX Runtime CUDA fp16
ENGINES = ALL_CPU_ENGINES + list(GPU_ENGINES)


def available(engine: str) -> str | None:
    """None if the engine can run here, else why not."""
    import importlib.util

    need = {"hf": ["torch", "transformers"], "paddle": ["paddle"], "paddle-gpu": ["paddle"]}.get(engine, [])
    if engine.startswith("ort-"):
        need = ["onnxruntime"]
    if engine.startswith("llama-"):  # gguf writes the files; llama-q4_k_m's is llama_cpp's quantizer's
        need = ["llama_cpp", "gguf"]
    if engine.startswith("genai-"):
        need = ["onnxruntime_genai"]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if engine == "paddle-gpu":
        import paddle

        if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
            return "needs Paddle's GPU build and a CUDA GPU"
    if engine == "ort-cuda-fp16":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "needs onnxruntime-gpu and a CUDA GPU"
    return None


# ---- measuring one engine (in a child process) -------------------------------------------------------------
class _HF:
    """transformers eager (the parity oracle's loader) behind the small interface the measurements use."""

    def __init__(self, path: str, threads: int):
        import torch

        from ernie_paddle.parity.probes import load_hf_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_hf_model(path)

    def prefill(self, ids):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor(ids), use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values

    def step(self, tokens, past):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor(tokens)[:, None], past_key_values=past, use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values


class _Ours:
    """Paddle eager or an ONNX Runtime folder: both have allocate_cache and a call returning logits. Decode is timed
    through `generation.stream_batch`, the loop `generate` runs (token choice and bookkeeping included)."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len

    def decode_seconds(self, ids, steps: int) -> float:
        """Seconds for `steps` greedy decode steps after the prompt `ids` [B, T] and its first token."""
        from ernie_paddle.generation import GenerationConfig, stream_batch

        loop = stream_batch(self.model, ids.tolist(), GenerationConfig(max_new_tokens=steps + 1, eos_token_ids=[]))
        next(loop)
        t = time.perf_counter()
        for _ in loop:
            pass
        return time.perf_counter() - t

    def prefill(self, ids):
        cache = self.model.allocate_cache(len(ids), self.max_len)
        return logits_numpy(self.model(ids, cache=cache, last_only=True))[:, -1], cache

    def step(self, tokens, cache):
        import numpy as np

        return logits_numpy(self.model(np.asarray(tokens)[:, None], cache=cache, last_only=True))[:, -1], cache


def llama_logits(llm):
    """The last decoded position's logits, read in place from a llama-cpp-python `Llama`'s context (valid until its
    next decode)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


class _Llama:
    """llama.cpp through llama-cpp-python, one sequence. Logits of the last token only (computing every position's,
    `logits_all`, would slow prefill); read from the context, since `Llama.scores` holds them only with
    `logits_all` (llama-cpp-python >= 0.3.36 leaves it empty otherwise)."""

    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)

    def _last_logits(self):
        return llama_logits(self.llm).copy()[None]

    def prefill(self, ids):
        if len(ids) != 1:
            raise NotImplementedError("llama-cpp-python's Llama object decodes one sequence")
        self.llm.reset()
        self.llm.eval([int(t) for t in ids[0]])
        return self._last_logits(), None

    def step(self, tokens, _):
        if len(tokens) != 1:
            raise NotImplementedError("batch > 1")
        self.llm.eval([int(tokens[0])])
        return self._last_logits(), None


class _Genai:
    """onnxruntime-genai on an exported folder, with its own greedy loop (what an application embedding it gets):
    prefill appends the prompt, each step is one `generate_next_token`, which feeds back the argmax itself."""

    def __init__(self, path: str, threads: int, max_len: int):
        import onnxruntime_genai as og

        config = og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model, self.max_len = og, og.Model(config), max_len

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_len, min_length=self.max_len, do_sample=False,
                                  batch_size=len(ids))
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(ids.astype("int32"))
        return gen.get_logits()[:, -1], gen

    def step(self, tokens, gen):
        gen.generate_next_token()  # picks the argmax of the last logits (the `tokens` given) and runs the model
        return gen.get_logits()[:, -1], gen


def _runner(engine: str, path: str, threads: int, max_len: int):
    """The engine loaded from `path`, behind prefill(ids [B, T]) and step(tokens [B], state) -> (logits [B, V],
    state)."""
    if engine in ("paddle", "paddle-gpu"):
        import paddle

        from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

        if engine == "paddle-gpu":
            paddle.set_device("gpu")
        dtype = "bfloat16" if engine == "paddle-gpu" else "float32"
        return _Ours(Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=dtype), max_len)
    if engine.startswith("ort-"):
        from ernie_paddle.ort.runtime import OnnxCausalLM

        provider = "cuda" if engine == "ort-cuda-fp16" else "cpu"
        return _Ours(OnnxCausalLM(path, provider=provider, threads=threads), max_len)
    if engine == "hf":
        return _HF(path, threads)
    if engine.startswith("genai-"):
        return _Genai(path, threads, max_len)
    return _Llama(path, threads, max_len)


def _decode_tok_s(runner, rng, vocab: int, batch: int, decode_tokens: int) -> float:
    """Greedy decode speed at `batch` after a 16-token prefill: each step feeds the token the last one chose."""
    if hasattr(runner, "decode_seconds"):
        return round(batch * decode_tokens / runner.decode_seconds(rng.integers(3, vocab, (batch, 16)),
                                                                   decode_tokens), 2)
    logits, state = runner.prefill(rng.integers(3, vocab, (batch, 16)))
    tokens = logits.argmax(-1)
    t = time.perf_counter()
    for _ in range(decode_tokens):
        logits, state = runner.step(tokens, state)
        tokens = logits.argmax(-1)
    return round(batch * decode_tokens / (time.perf_counter() - t), 2)


def measure(engine: str, path: str, prompt_lengths: list[int], batches: list[int], decode_tokens: int,
            threads: int, seed: int, vocab: int) -> dict:
    """Load time, prefill tokens/s per prompt length (the first one's time is the time to first token), decode
    tokens/s per batch size and peak RSS of one engine, in this process."""
    import numpy as np

    t0 = time.perf_counter()
    runner = _runner(engine, path, threads, max(prompt_lengths) + decode_tokens + 8)
    result = {"engine": engine, "load_s": round(time.perf_counter() - t0, 2), "prefill_tok_s": {}, "decode_tok_s": {}}
    rng = np.random.default_rng(seed)
    runner.prefill(rng.integers(3, vocab, (1, 8)))  # warm-up
    for n in prompt_lengths:
        ids = rng.integers(3, vocab, (1, n))
        t = time.perf_counter()
        logits, _ = runner.prefill(ids)
        int(logits.argmax())
        dt = time.perf_counter() - t
        result["prefill_tok_s"][str(n)] = round(n / dt, 2)
        if n == prompt_lengths[0]:
            result["ttft_s"] = round(dt, 4)
    for b in batches:
        try:
            result["decode_tok_s"][str(b)] = _decode_tok_s(runner, rng, vocab, b, decode_tokens)
        except NotImplementedError as e:
            result["decode_tok_s"][str(b)] = None
            result.setdefault("notes", []).append(f"batch {b}: {e}")
    result["peak_rss_gb"] = round(peak_rss() / 2**30, 3)
    return result


# ---- the program -------------------------------------------------------------------------------------------
RATIO_TO = ("paddle", "llama-q4_0", "llama-q4_k_m")  # the table's last columns: decode b1 over each one's


def token_bytes(engine: str, path: str, cfg):
    """The weight bytes the engine's file holds and reads per decoded token (`weight_bytes`), or None (Paddle,
    transformers: every weight in the compute dtype)."""
    from ernie_paddle.benchmarking.weight_bytes import gguf_token_bytes, onnx_token_bytes

    if engine.startswith(("ort-", "genai-")) and engine != "ort-portable":
        return onnx_token_bytes(path)
    if engine.startswith("llama-"):
        return gguf_token_bytes(path, cfg.moe_k)
    return None


def floor_share(row: dict, read_gb_per_s: float) -> float | None:
    """Decode at batch 1 as a share of its bandwidth floor: tokens/s times the bytes a token reads (the prepacked
    layout where the kernels repack) over the measured read bandwidth."""
    wb, d1 = row.get("weight_bytes"), row.get("decode_tok_s", {}).get("1")
    if not wb or not d1:
        return None
    return d1 * wb.get("packed_per_token_gb", wb["per_token_gb"]) / read_gb_per_s


def _table(rows: list[dict], prompt_lengths: list[int], batches: list[int]) -> str:
    refs = [next((r for r in rows if r["engine"] == e and "error" not in r), None) for e in RATIO_TO]
    head = (["engine"] + [f"prefill@{n} tok/s" for n in prompt_lengths] + ["TTFT s"] +
            [f"decode b{b} tok/s" for b in batches] + ["peak RSS GB", "GB read / token", "% of floor"] +
            [f"decode b1 / {e.replace('llama-', 'llama ')}" for e in RATIO_TO])
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(" | ".join([r["engine"], f"skipped: {r['error']}"] + [""] * (len(head) - 2)))
            continue
        d1 = r["decode_tok_s"].get(str(batches[0]))

        def ratio(base):
            b = base and base["decode_tok_s"].get(str(batches[0]))
            return f"{d1 / b:.2f}x" if d1 and b else "-"

        wb, share = r.get("weight_bytes"), r.get("share_of_bandwidth_floor")
        cells = ([r["engine"]] + [str(r["prefill_tok_s"].get(str(n), "-")) for n in prompt_lengths] +
                 [str(r.get("ttft_s", "-"))] + [str(r["decode_tok_s"].get(str(b)) or "n/a") for b in batches] +
                 [str(r["peak_rss_gb"]), f"{wb.get('packed_per_token_gb', wb['per_token_gb']):.3f}" if wb else "-",
                  f"{share:.0%}" if share else "-"] + [ratio(ref) for ref in refs])
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _plot(rows: list[dict], batches: list[int], path: str) -> bool:
    made = subplots("bench", figsize=(9, 4))
    if made is None:
        return False
    fig, ax = made
    ok = [r for r in rows if "error" not in r]
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        vals = [r["decode_tok_s"].get(str(b)) or 0 for r in ok]
        ax.bar([x + i * width for x in range(len(ok))], vals, width, label=f"decode batch {b}")
    ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(ok))], [r["engine"] for r in ok],
                  rotation=30, ha="right")
    ax.set_ylabel("tokens / s")
    ax.legend()
    write_png(fig, path)
    return True


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ernie-paddle bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mid", choices=list(SETUPS),
                   help="tiny: a smoke test; mid: the 21B-A3B widths with 3 layers; 21b-a3b: the full shape, int "
                        "engines only")
    p.add_argument("--engines", default=None, type=name_list(ENGINES, "engine(s)"),
                   help="comma-separated subset (default: the preset's engines)")
    p.add_argument("--num-layers", type=positive_int, default=None, help="override the preset's layer count")
    p.add_argument("--work", default=None, help="folder for the checkpoint, exports and GGUF files (reused)")
    p.add_argument("--prompt-lengths", default=[128, 512], type=positive_int_list)
    p.add_argument("--batches", default=[1, 4], type=positive_int_list)
    p.add_argument("--decode-tokens", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--block-size", type=block_size, default=DEFAULT_BLOCK_SIZE,
                   help="the ONNX int8/int4 exports' quantisation block size (a power of two >= 16)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="the ONNX int8/int4 exports' MatMulNBits/QMoE accuracy_level (default 4: int8 activations)")
    p.add_argument("--kv-cache", default="auto", choices=KV_CACHES,
                   help="the ONNX exports' KV cache (default auto: int8 for int8/int4, else fp32)")
    p.add_argument("--attention-precision", default=None, choices=list(BITS),
                   help="the ONNX int8/int4 exports' attention projections (export --attention-precision)")
    p.add_argument("--block-scales", default=DEFAULT_SCALE_RULE, choices=SCALE_RULES,
                   help=f"the ONNX int8/int4 exports' block scales (export --block-scales; default "
                        f"{DEFAULT_SCALE_RULE})")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--run-engine", default=None, help=argparse.SUPPRESS)  # internal: measure one engine
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _measure_row(engine: str, path: str, source: str | None, args: argparse.Namespace, cfg) -> dict:
    """One engine's row, measured in a child process, with what it ran: the folder or file (`path`; with meta's
    export options, the row's recipe), the weight bytes it reads per token, and for a GGUF llama.cpp quantized,
    what from (`source`)."""
    log(f"bench: measuring {engine}" + (f" (its GGUF quantized by llama.cpp from {source})" if source else ""))
    row = measure_in_child(engine, path, prompt_lengths=args.prompt_lengths, batches=args.batches,
                           decode_tokens=args.decode_tokens, threads=args.threads, seed=args.seed,
                           vocab=cfg.vocab_size)
    row["path"] = path
    if (tb := token_bytes(engine, path, cfg)) is not None:
        row["weight_bytes"] = tb.as_dict()
    if source:
        row["gguf_source"] = source
    if "error" in row:
        log(f"bench: {engine} failed: {row['error']}")
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.run_engine:
        print(json.dumps(measure(args.run_engine, args.path, args.prompt_lengths, args.batches, args.decode_tokens,
                                 args.threads, args.seed, args.vocab)))
        return 0
    engines = args.engines or SETUPS[args.preset].engines
    work = args.work or os.path.join(os.getcwd(), f"bench-{args.preset}")
    why_not = {e: why for e in engines if (why := available(e))}
    options = ExportOptions(args.block_size, args.accuracy_level, args.kv_cache, args.block_scales,
                            args.attention_precision)
    made = [e for e in engines if e not in why_not]
    paths, refused, cfg = prepare(args.preset, work, made, args.seed, args.num_layers, export_options=options,
                                  threads=args.threads)
    direct = from_random_tensors(args.preset, made)
    meta = run_meta(args.preset, cfg, args.threads, decode_tokens=args.decode_tokens,
                    export_options=options._asdict())  # before the engines: the bandwidth of an idle machine
    why_not.update(refused)
    rows = []
    for e in engines:
        if e in why_not:
            rows.append({"engine": e, "error": why_not[e]})
            log(f"bench: {e}: {why_not[e]}")
            continue
        rows.append(_measure_row(e, paths[e], gguf_source(e, direct), args, cfg))
    for r in rows:
        if (share := floor_share(r, meta["read_gb_per_s"])) is not None:
            r["share_of_bandwidth_floor"] = round(share, 3)
    print(_table(rows, args.prompt_lengths, args.batches))
    if args.json:
        write_json(args.json, {"meta": meta, "results": rows})
    if args.plot:
        _plot(rows, args.batches, args.plot)
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "ernie-paddle bench"))

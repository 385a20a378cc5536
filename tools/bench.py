"""Benchmark ERNIE-4.5 engines on the same weights: Paddle eager, ONNX Runtime (portable / ort fp32 / int8 /
int4), transformers eager (torch), and llama.cpp through llama-cpp-python (GGUF F16 / Q8_0 / Q4_0) when installed.

For each engine, in its own process (so peak RSS is that engine's): prefill tokens/s at each prompt length,
time to first token, decode tokens/s at each batch size. Prints a table with every engine's ratio to Paddle
eager and to llama.cpp, writes JSON and (with matplotlib) a PNG chart. A program, not a test.

    python -m ernie_paddle.tools.bench --preset mid --json bench.json --plot bench.png
    ernie-paddle bench --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from ernie_paddle.generation import logits_numpy

PRESETS = {  # (config preset, layers, engines run by default)
    "tiny": ("tiny", None, ["paddle", "ort-portable", "ort-fp32", "ort-int8", "ort-int4", "hf", "llama-f16",
                            "llama-q8_0", "llama-q4_0"]),
    "mid": ("21b-a3b", 3, ["paddle", "ort-portable", "ort-fp32", "ort-int8", "ort-int4", "hf", "llama-f16",
                           "llama-q8_0", "llama-q4_0"]),
    "21b-a3b": ("21b-a3b", None, ["ort-int8", "ort-int4", "llama-q8_0", "llama-q4_0"]),
}
ORT_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4", "ort-cuda-fp16": "fp16"}
GPU_ENGINES = ("paddle-gpu", "ort-cuda-fp16")  # Paddle bf16 with the fused kernels; ONNX Runtime CUDA fp16
GGUF_TYPES = {"llama-f16": "F16", "llama-q8_0": "Q8_0", "llama-q4_0": "Q4_0"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- preparing artifacts (in the parent process) ---------------------------------------------------------------
def prepare(preset: str, work: str, engines: list[str], seed: int, num_layers: int | None):
    """Checkpoint, ONNX exports and GGUF files for the engines, made once and reused from `work`."""
    from ernie_paddle.checkpoint import make_checkpoint
    from ernie_paddle.config import preset as make_preset

    name, layers, _ = PRESETS[preset]
    layers = num_layers or layers
    cfg = make_preset(name, **({"num_hidden_layers": layers} if layers else {}))
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, f"{preset}-ckpt")
    # the full shape is benchmarked in int8/int4 only: its artifacts are made straight from random tensors,
    # without a 44 GB bf16 checkpoint on disk
    direct = preset == "21b-a3b" and all(e.startswith(("ort-int", "llama-q")) for e in engines)
    if not direct and not os.path.isdir(ckpt):
        log(f"bench: writing a random {preset} checkpoint to {ckpt}")
        make_checkpoint(cfg, ckpt, layout="paddle", dtype="bfloat16", seed=seed)
    paths = {"paddle": ckpt, "hf": ckpt, "paddle-gpu": ckpt}
    for e in engines:
        if e.startswith("ort-"):
            flavor, precision = ("portable", "fp32") if e == "ort-portable" else ("ort", ORT_PRECISION[e])
            out = os.path.join(work, f"{preset}-{e}")
            if not os.path.isdir(out):
                from ernie_paddle.errors import ExportError
                from ernie_paddle.export.pipeline import export

                log(f"bench: exporting {e}")
                try:
                    if direct:
                        from ernie_paddle.checkpoint import random_tensors

                        export(None, out, flavor=flavor, precision=precision, verify=False, accuracy_level=4,
                               config=cfg, tensors=random_tensors(cfg, seed), log=log)
                    else:
                        export(ckpt, out, flavor=flavor, precision=precision, verify=False,
                               accuracy_level=4 if precision in ("int8", "int4") else 0)
                except ExportError as err:  # e.g. the portable flavour past 2 GiB
                    paths[e] = ExportError(str(err))
                    continue
            paths[e] = out
        elif e.startswith("llama-"):
            out = os.path.join(work, f"{preset}-{GGUF_TYPES[e].lower()}.gguf")
            if not os.path.isfile(out):
                from ernie_paddle.export.gguf import write_gguf

                log(f"bench: writing {out}")
                if direct:
                    from ernie_paddle.checkpoint import random_tensors

                    write_gguf(None, out, GGUF_TYPES[e], config=cfg, tensors=random_tensors(cfg, seed))
                else:
                    write_gguf(ckpt, out, GGUF_TYPES[e])
            paths[e] = out
    if "hf" in engines:
        pt = os.path.join(work, f"{preset}-ckpt-pt")
        if not os.path.isdir(pt):
            from ernie_paddle.checkpoint import convert

            convert(ckpt, pt, layout="pt", dtype="bfloat16")
        paths["hf"] = pt
    return paths, cfg


def available(engine: str) -> str | None:
    """None if the engine can run here, else why not."""
    import importlib.util

    need = {"hf": ["torch", "transformers"], "paddle": ["paddle"], "paddle-gpu": ["paddle"]}.get(engine, [])
    if engine.startswith("ort-"):
        need = ["onnxruntime"]
    if engine.startswith("llama-"):
        need = ["llama_cpp", "gguf"]
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
    """transformers eager behind the small interface the measurements use."""

    def __init__(self, path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                          experts_implementation="eager").eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor(ids), use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values

    def step(self, tokens, past):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor(tokens)[:, None], past_key_values=past, use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values


class _Ours:
    """Paddle eager or an ONNX Runtime folder: both have allocate_cache and a call returning logits."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len

    def prefill(self, ids):
        cache = self.model.allocate_cache(len(ids), self.max_len)
        return logits_numpy(self.model(ids, cache=cache, last_only=True))[:, -1], cache

    def step(self, tokens, cache):
        import numpy as np

        return logits_numpy(self.model(np.asarray(tokens)[:, None], cache=cache, last_only=True))[:, -1], cache


class _Llama:
    def __init__(self, path: str, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=False, verbose=False)

    def prefill(self, ids):
        import numpy as np

        if len(ids) != 1:
            raise NotImplementedError("llama-cpp-python's Llama object decodes one sequence")
        self.llm.reset()
        self.llm.eval(list(map(int, ids[0])))
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])[None], None

    def step(self, tokens, _):
        import numpy as np

        if len(tokens) != 1:
            raise NotImplementedError("batch > 1")
        self.llm.eval([int(tokens[0])])
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])[None], None


def measure(engine: str, path: str, prompt_lengths: list[int], batches: list[int], decode_tokens: int,
            threads: int, seed: int, vocab: int) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    max_len = max(prompt_lengths) + decode_tokens + 8
    if engine in ("paddle", "paddle-gpu"):
        import paddle

        from ernie_paddle.modeling import Ernie4_5_MoeForCausalLM

        if engine == "paddle-gpu":
            paddle.set_device("gpu")
        dtype = "bfloat16" if engine == "paddle-gpu" else "float32"
        runner = _Ours(Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=dtype), max_len)
    elif engine.startswith("ort-"):
        from ernie_paddle.onnx_runtime import OnnxCausalLM

        provider = "cuda" if engine == "ort-cuda-fp16" else "cpu"
        runner = _Ours(OnnxCausalLM(path, provider=provider, threads=threads), max_len)
    elif engine == "hf":
        runner = _HF(path, threads)
    else:
        runner = _Llama(path, threads, max_len)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    result = {"engine": engine, "load_s": round(load_s, 2), "prefill_tok_s": {}, "decode_tok_s": {}}
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
            logits, state = runner.prefill(rng.integers(3, vocab, (b, 16)))
            tokens = logits.argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_tokens):
                logits, state = runner.step(tokens, state)
                tokens = logits.argmax(-1)
            result["decode_tok_s"][str(b)] = round(b * decode_tokens / (time.perf_counter() - t), 2)
        except NotImplementedError as e:
            result["decode_tok_s"][str(b)] = None
            result.setdefault("notes", []).append(f"batch {b}: {e}")
    from ernie_paddle.sysinfo import peak_rss

    result["peak_rss_gb"] = round(peak_rss() / 2**30, 3)
    return result


# ---- the program -------------------------------------------------------------------------------------------
def _table(rows: list[dict], prompt_lengths: list[int], batches: list[int]) -> str:
    ref = next((r for r in rows if r["engine"] == "paddle" and "error" not in r), None)
    lref = next((r for r in rows if r["engine"] == "llama-q4_0" and "error" not in r), None)
    head = (["engine"] + [f"prefill@{n} tok/s" for n in prompt_lengths] + ["TTFT s"] +
            [f"decode b{b} tok/s" for b in batches] + ["peak RSS GB", "decode b1 / paddle", "decode b1 / llama q4_0"])
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(" | ".join([r["engine"], f"skipped: {r['error']}"] + [""] * (len(head) - 2)))
            continue
        d1 = r["decode_tok_s"].get(str(batches[0]))

        def ratio(base):
            b = base and base["decode_tok_s"].get(str(batches[0]))
            return f"{d1 / b:.2f}x" if d1 and b else "-"

        cells = ([r["engine"]] + [str(r["prefill_tok_s"].get(str(n), "-")) for n in prompt_lengths] +
                 [str(r.get("ttft_s", "-"))] + [str(r["decode_tok_s"].get(str(b)) or "n/a") for b in batches] +
                 [str(r["peak_rss_gb"]), ratio(ref), ratio(lref)])
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _plot(rows: list[dict], batches: list[int], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("bench: matplotlib is not installed; no chart written (pip install matplotlib)")
        return False
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        vals = [r["decode_tok_s"].get(str(b)) or 0 for r in ok]
        ax.bar([x + i * width for x in range(len(ok))], vals, width, label=f"decode batch {b}")
    ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(ok))], [r["engine"] for r in ok],
                  rotation=30, ha="right")
    ax.set_ylabel("tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ernie-paddle bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mid", choices=list(PRESETS))
    p.add_argument("--engines", default=None, help="comma-separated subset (default: the preset's engines)")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--work", default=None, help="folder for the checkpoint, exports and GGUF files (reused)")
    p.add_argument("--prompt-lengths", default="128,512")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--run-engine", default=None, help=argparse.SUPPRESS)  # internal: measure one engine
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if args.run_engine:
        print(json.dumps(measure(args.run_engine, args.path, lengths, batches, args.decode_tokens, args.threads,
                                 args.seed, args.vocab)))
        return 0

    engines = args.engines.split(",") if args.engines else PRESETS[args.preset][2]
    work = args.work or os.path.join(os.getcwd(), f"bench-{args.preset}")
    runnable = [e for e in engines if available(e) is None]
    paths, cfg = prepare(args.preset, work, runnable, args.seed, args.num_layers)
    rows = []
    for e in engines:
        why = available(e)
        if why:
            rows.append({"engine": e, "error": why})
            log(f"bench: {e}: {why}")
            continue
        if isinstance(paths.get(e), Exception):
            rows.append({"engine": e, "error": str(paths[e])[:200]})
            log(f"bench: {e}: {paths[e]}")
            continue
        log(f"bench: measuring {e}")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, "-m", "ernie_paddle.tools.bench", "--run-engine", e, "--path", paths[e],
               "--prompt-lengths", args.prompt_lengths, "--batches", args.batches, "--decode-tokens",
               str(args.decode_tokens), "--threads", str(args.threads), "--seed", str(args.seed),
               "--vocab", str(cfg.vocab_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            rows.append({"engine": e, "error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]})
            log(f"bench: {e} failed: {rows[-1]['error']}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    table = _table(rows, lengths, batches)
    print(table)
    meta = {"preset": args.preset, "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
            "moe_num_experts", "moe_k", "num_attention_heads", "num_key_value_heads", "vocab_size")}, "threads": args.threads, "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "decode_tokens": args.decode_tokens, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    if args.plot:
        _plot(rows, batches, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

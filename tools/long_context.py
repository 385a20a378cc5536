"""Long-context parity: one long prompt prefilled in chunks through Paddle, ONNX Runtime and transformers.

Each runtime runs the prompt `--chunk` tokens at a time through its own KV cache (a one-shot 32K prefill would need
32K x 32K fp32 attention scores per head), then `--decode` greedy steps fed with Paddle's tokens. Prints a table
(prefill wall time, decode time per token, max |logit diff| against Paddle on the last chunk and on the decode steps,
how many of Paddle's greedy tokens each candidate also picks) and writes it as JSON.

Without `--model` it builds a random checkpoint of `--preset` (default tiny, max_position_embeddings 131072),
exports it to ONNX (`ort` flavour, fp32) and converts it to -PT for transformers, in a temporary folder.

    python -m ernie_paddle.tools.long_context --tokens 32768 --chunk 2048 --json long_context.json
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time

import numpy as np

from ernie_paddle.cli.args import non_negative_int, positive_int
from ernie_paddle.interrupts import run_command

RUNTIMES = ("paddle", "ort", "ort-kv8", "hf")  # ort-kv8: the ort export with the int8 KV cache


def prepare(args, work: str) -> tuple[str, str | None, str | None, str | None]:
    """(checkpoint dir, ort folder, ort folder with the int8 KV cache, -PT dir): made here unless given."""
    from ernie_paddle.checkpoint.folder import convert, make_checkpoint
    from ernie_paddle.config import preset
    from ernie_paddle.export import pipeline

    model = args.model
    if model is None:
        cfg = preset(args.preset, max_position_embeddings=131072)
        model = os.path.join(work, "ckpt")
        make_checkpoint(cfg, model, dtype="float32", seed=args.seed)
    onnx_dir = pt_dir = None
    if "ort" in args.runtimes:
        onnx_dir = args.onnx or os.path.join(work, "onnx")
        if args.onnx is None:
            pipeline.export(model, onnx_dir, flavor="ort", precision="fp32")
    kv8_dir = None
    if "ort-kv8" in args.runtimes:
        kv8_dir = os.path.join(work, "onnx-kv8")
        pipeline.export(model, kv8_dir, flavor="ort", precision="fp32", kv_cache="int8", verify=False)
    if "hf" in args.runtimes:
        pt_dir = os.path.join(work, "pt")
        convert(model, pt_dir, layout="pt", dtype="float32")
    return model, onnx_dir, kv8_dir, pt_dir


def _paddle(model_dir):
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    m = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir)
    return m.allocate_cache, lambda ids, mask, pos, cache: m(ids, attention_mask=mask, position_ids=pos,
                                                             cache=cache).logits.numpy()


def _ort(folder):
    from ernie_paddle.ort.runtime import OnnxCausalLM

    m = OnnxCausalLM(folder)
    return m.allocate_cache, lambda ids, mask, pos, cache: m(ids, attention_mask=mask, position_ids=pos,
                                                             cache=cache).logits


def _hf(pt_dir):
    import inspect

    import torch
    from transformers import DynamicCache

    from ernie_paddle.parity.probes import load_hf_model

    m = load_hf_model(pt_dir)
    arg = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"

    def step(ids, mask, pos, cache):
        with torch.no_grad():
            return m(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos),
                     use_cache=True, **{arg: cache}).logits.numpy()

    return lambda b, n: DynamicCache(config=m.config), step


def run_one(name: str, path: str, ids: np.ndarray, chunk: int, decode: int, forced: list[int] | None) -> dict:
    """Chunked prefill then `decode` steps; feeds `forced` tokens (Paddle's greedy) or, for Paddle, its own."""
    allocate, step = {"paddle": _paddle, "ort": _ort, "ort-kv8": _ort, "hf": _hf}[name](path)
    n = ids.shape[1]
    mask = np.ones((1, n + decode), np.int64)
    pos = np.arange(n + decode, dtype=np.int64)[None]
    cache = allocate(1, n + decode)
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        logits = step(ids[:, s:e], mask[:, :e], pos[:, s:e], cache)
    prefill_s = time.perf_counter() - t0
    last_chunk, own, dec = logits[0], [], []
    t0 = time.perf_counter()
    for j in range(decode):
        own.append(int(logits[0, -1].argmax()))
        tok = own[-1] if forced is None else forced[j]
        logits = step(np.array([[tok]]), mask[:, :n + j + 1], pos[:, n + j:n + j + 1], cache)
        dec.append(logits[0, -1])
    decode_s = time.perf_counter() - t0
    del cache, step, allocate
    gc.collect()
    return {"prefill_s": prefill_s, "decode_s_per_token": decode_s / max(decode, 1), "last_chunk": last_chunk,
            "decode_logits": np.array(dec), "greedy": own}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random one of --preset)")
    p.add_argument("--onnx", default=None, help="an exported ort-flavour folder of --model (default: export one)")
    p.add_argument("--preset", default="tiny", help="config preset of the random checkpoint (131072 positions)")
    p.add_argument("--tokens", type=positive_int, default=32768, help="prompt length")
    p.add_argument("--chunk", type=positive_int, default=2048, help="prefill chunk (tokens per pass)")
    p.add_argument("--decode", type=non_negative_int, default=8, help="greedy decode steps after the prompt")
    p.add_argument("--runtimes", default="paddle,ort,hf", help=f"comma-separated, from {','.join(RUNTIMES)}")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    if "paddle" not in args.runtimes or any(r not in RUNTIMES for r in args.runtimes):
        p.error(f"--runtimes must include paddle (the reference) and only name {', '.join(RUNTIMES)}")

    from ernie_paddle.config import ErnieConfig

    with tempfile.TemporaryDirectory(prefix="ernie-long-context-") as work:
        t0 = time.time()
        model, onnx_dir, kv8_dir, pt_dir = prepare(args, work)
        cfg = ErnieConfig.from_file(model)
        if args.tokens + args.decode > cfg.max_position_embeddings:
            p.error(f"--tokens + --decode exceeds max_position_embeddings {cfg.max_position_embeddings}")
        print(f"# {args.tokens}-token prompt, chunks of {args.chunk}, {args.decode} decode steps; model "
              f"{args.model or args.preset} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
              f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}); prepared in "
              f"{time.time() - t0:.1f}s", file=sys.stderr)
        ids = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, (1, args.tokens))
        paths = {"paddle": model, "ort": onnx_dir, "ort-kv8": kv8_dir, "hf": pt_dir}
        ref = run_one("paddle", model, ids, args.chunk, args.decode, None)
        print(f"# paddle: prefill {ref['prefill_s']:.1f}s", file=sys.stderr)
        rows = [{"runtime": "paddle", "prefill_s": ref["prefill_s"], "decode_s_per_token": ref["decode_s_per_token"],
                 "last_chunk_max_abs_diff": 0.0, "decode_max_abs_diff": 0.0, "greedy_identical": args.decode}]
        for name in [r for r in args.runtimes if r != "paddle"]:
            r = run_one(name, paths[name], ids, args.chunk, args.decode, ref["greedy"])
            print(f"# {name}: prefill {r['prefill_s']:.1f}s", file=sys.stderr)
            rows.append({"runtime": name, "prefill_s": r["prefill_s"], "decode_s_per_token": r["decode_s_per_token"],
                         "last_chunk_max_abs_diff": float(np.abs(r["last_chunk"] - ref["last_chunk"]).max()),
                         "decode_max_abs_diff": float(np.abs(r["decode_logits"] - ref["decode_logits"]).max())
                         if args.decode else 0.0,
                         "greedy_identical": sum(a == b for a, b in zip(r["greedy"], ref["greedy"]))})
    print(f"{'runtime':>7} | {'prefill s':>9} | {'decode ms/token':>15} | {'last chunk max|d|':>17} | "
          f"{'decode max|d|':>13} | greedy same")
    for r in rows:
        print(f"{r['runtime']:>7} | {r['prefill_s']:>9.1f} | {1e3 * r['decode_s_per_token']:>15.1f} | "
              f"{r['last_chunk_max_abs_diff']:>17.2e} | {r['decode_max_abs_diff']:>13.2e} | "
              f"{r['greedy_identical']} of {args.decode}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"# peak resident memory {peak_gib:.1f} GiB; Paddle's greedy tokens {ref['greedy']}", file=sys.stderr)
    if args.json:
        meta = {"tokens": args.tokens, "chunk": args.chunk, "decode": args.decode, "model": args.model or args.preset,
                "seed": args.seed, "paddle_greedy": ref["greedy"], "peak_rss_gib": peak_gib}
        from ernie_paddle.benchmarking.setups import machine_meta

        meta = machine_meta(os.cpu_count() or 1, **meta)
        from ernie_paddle.atomic import write_json

        write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "long_context"))

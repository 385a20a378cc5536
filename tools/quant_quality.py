"""Quantisation quality on the shipped trained model: held-out perplexity and greedy agreement per precision.

Paddle fp32 is the reference; ONNX Runtime runs fp32, fp16, int8, int4 (blocks 32, 64 and 128) and int2, with
round-to-nearest (RTN) and, for int4 (blocks 32, 64, 128) and int2, the GPTQ-style calibrated scheme
(`export/gptq.py`, calibrated on the training split); then again with the `mse` block scales (and int4 block 128
with int8 attention projections), each with the fp32 KV cache; then fp32/int8/int4 with the int8 KV cache. Prints a
table and writes JSON.

    python -m ernie_paddle.tools.quant_quality --json quant.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import NamedTuple

import numpy as np

from ernie_paddle.atomic import write_json
from ernie_paddle.errors import InputError
from ernie_paddle.corpus import DEFAULT_CORPUS, read_corpus, split_corpus
from ernie_paddle.files import onnx_data
from ernie_paddle.interrupts import run_command
from ernie_paddle.precisions import attention_precision_of
from ernie_paddle.scoring import perplexity, shared_prefix

class Variant(NamedTuple):
    """One exported candidate: its label, precision, block size, scheme (rtn | gptq), KV cache, block scales and the
    attention projections' own precision (None: the weights')."""

    label: str
    precision: str
    block: int
    scheme: str
    kv_cache: str
    rule: str = "absmax"
    attention: str | None = None


VARIANTS = [  # the weights' rows with the float cache, then with the mse rule, then int8 caches
    Variant("ort fp32", "fp32", 32, "rtn", "fp32"), Variant("ort fp16", "fp16", 32, "rtn", "fp32"),
    Variant("ort int8", "int8", 32, "rtn", "fp32"), Variant("ort int4 b32 RTN", "int4", 32, "rtn", "fp32"),
    Variant("ort int4 b64 RTN", "int4", 64, "rtn", "fp32"), Variant("ort int4 b128 RTN", "int4", 128, "rtn", "fp32"),
    Variant("ort int4 b32 GPTQ", "int4", 32, "gptq", "fp32"), Variant("ort int4 b64 GPTQ", "int4", 64, "gptq", "fp32"),
    Variant("ort int4 b128 GPTQ", "int4", 128, "gptq", "fp32"), Variant("ort int2 b32 RTN", "int2", 32, "rtn", "fp32"),
    Variant("ort int2 b32 GPTQ", "int2", 32, "gptq", "fp32"),
    Variant("ort int8 mse", "int8", 32, "rtn", "fp32", "mse"),
    Variant("ort int4 b32 RTN mse", "int4", 32, "rtn", "fp32", "mse"),
    Variant("ort int4 b64 RTN mse", "int4", 64, "rtn", "fp32", "mse"),
    Variant("ort int4 b128 RTN mse", "int4", 128, "rtn", "fp32", "mse"),
    Variant("ort int4 b128 RTN mse attn int8", "int4", 128, "rtn", "fp32", "mse", "int8"),
    Variant("ort int4 b32 GPTQ mse", "int4", 32, "gptq", "fp32", "mse"),
    Variant("ort int4 b64 GPTQ mse", "int4", 64, "gptq", "fp32", "mse"),
    Variant("ort int4 b128 GPTQ mse", "int4", 128, "gptq", "fp32", "mse"),
    Variant("ort int2 b32 RTN mse", "int2", 32, "rtn", "fp32", "mse"),
    Variant("ort int2 b32 GPTQ mse", "int2", 32, "gptq", "fp32", "mse"),
    Variant("ort fp32 + int8 KV", "fp32", 32, "rtn", "int8"), Variant("ort int8 + int8 KV", "int8", 32, "rtn", "int8"),
    Variant("ort int4 b32 RTN + int8 KV", "int4", 32, "rtn", "int8"),
    Variant("ort int4 b64 RTN + int8 KV", "int4", 64, "rtn", "int8"),
]


def greedy_agreement(reference, candidate, prompts: list[list[int]], tokens: int) -> float:
    """Mean share of the first `tokens` greedy tokens that match before the first difference."""
    from ernie_paddle.generation import GenerationConfig, generate

    gen = GenerationConfig(max_new_tokens=tokens, eos_token_ids=[])
    shares = []
    for p in prompts:
        shares.append(shared_prefix(generate(reference, p, gen), generate(candidate, p, gen)) / tokens)
    return float(np.mean(shares))


def run(model_dir: str, corpus: str, work: str, seed: int = 0, calib_windows: int = 32, greedy_tokens: int = 32,
        variants=VARIANTS, log=lambda s: None) -> dict:
    from ernie_paddle.export.gptq import GPTQ
    from ernie_paddle.export.quantize import RoundToNearest
    from ernie_paddle.paddle.calibration import calibration_batches, layer_hessians
    from ernie_paddle.export.pipeline import export
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
    from ernie_paddle.ort.runtime import OnnxCausalLM
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer(model_dir)
    train_text, heldout_text = split_corpus(read_corpus(corpus))
    heldout = np.array(tok.encode(heldout_text), np.int64)
    train = np.array(tok.encode(train_text), np.int64)
    calib = calibration_batches(train, calib_windows, seed=seed)
    prompts = [heldout[i:i + 16].tolist() for i in range(0, 4 * 997, 997)]
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir)
    rows = [{"variant": "paddle fp32", "perplexity": perplexity(reference.logits, heldout), "greedy_agreement": 1.0}]
    log(f"quality: paddle fp32 perplexity {rows[0]['perplexity']:.3f}")
    hessians = None
    for label, precision, block, scheme, kv_cache, rule, attention in variants:
        quantizer = RoundToNearest(rule)
        if scheme == "gptq":
            hessians = hessians or layer_hessians(reference, calib)
            quantizer = GPTQ(hessians, rule)
        out = os.path.join(work, label.replace(" ", "-"))
        export(model_dir, out, precision=precision, block_size=block, verify=False, quantizer=quantizer,
               kv_cache=kv_cache, attention_precision=attention)
        cand = OnnxCausalLM(out)
        row = {"variant": label, "precision": precision, "block_size": block, "scheme": scheme, "kv_cache": kv_cache,
               "block_scales": rule, "attention_precision": attention_precision_of(precision, attention),
               "perplexity": perplexity(cand.logits, heldout),
               "greedy_agreement": greedy_agreement(reference, cand, prompts, greedy_tokens),
               "weights_mib": round(os.path.getsize(os.path.join(out, onnx_data())) / 2**20, 2)}
        if scheme == "gptq":
            row["calibrated_tensors"] = len(quantizer.calibrated)
        row["perplexity_vs_fp32"] = row["perplexity"] / rows[0]["perplexity"] - 1
        rows.append(row)
        log(f"quality: {label} perplexity {row['perplexity']:.3f} ({row['perplexity_vs_fp32']:+.2%}), "
            f"greedy agreement {row['greedy_agreement']:.3f}")
    return {"model": os.path.abspath(model_dir), "heldout_tokens": int(len(heldout)), "calibration_windows":
            calib_windows, "greedy_tokens": greedy_tokens, "prompts": len(prompts), "results": rows}


def main(argv: list[str] | None = None) -> int:
    from ernie_paddle.cli.args import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=default_model_dir())
    p.add_argument("--data", default=DEFAULT_CORPUS,
                   help="UTF-8 text whose last 10%% is held out (default: the shipped Tiny Shakespeare)")
    p.add_argument("--variants", default=None,
                   help="comma-separated labels of the variants to run (default all: " +
                        ", ".join(v[0] for v in VARIANTS) + ")")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = VARIANTS
    if args.variants:
        wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {v[0] for v in VARIANTS}]
        if unknown or not wanted:
            raise InputError(f"--variants: unknown variant(s) {', '.join(unknown) or repr(args.variants)}; choose from "
                             + ", ".join(v[0] for v in VARIANTS))
        variants = [v for v in VARIANTS if v[0] in wanted]
    with tempfile.TemporaryDirectory() as work:
        report = run(args.model, args.data, work, variants=variants,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    print("| variant | held-out perplexity | vs fp32 | greedy agreement | weights MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in report["results"]:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r.get('perplexity_vs_fp32', 0):+.2%} | "
              f"{r['greedy_agreement']:.3f} | {r.get('weights_mib', '')} |")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "quant_quality"))

"""Decode speed with and without a JSON schema on one exported folder: what the grammar's per-token mask costs a
generation (`generation.Decoding` masks the logits before each choice). Runs alternate, same prompt, greedy, in one
process; tokens/s are counted from the first token to the last, so prefill is left out. A program, not a test:

    python -m ernie_paddle.tools.schema_decode --model FOLDER --json docs/schema-decode-mid.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from ernie_paddle import grammar
from ernie_paddle.atomic import write_json
from ernie_paddle.cli.args import folder, output_file, positive_int
from ernie_paddle.generation import GenerationConfig, stream
from ernie_paddle.interrupts import run_command

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "minItems": 8, "maxItems": 8,
                                                      "items": {"type": "string", "maxLength": 12}}},
          "required": ["notes"], "additionalProperties": False}
PROMPT = "Write eight short notes as JSON:"


def decode_rate(model, ids: list[int], gen: GenerationConfig) -> tuple[float, int]:
    """(tokens/s after the first token, tokens generated)."""
    times = [time.perf_counter() for _ in stream(model, ids, gen)]
    return ((len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")), len(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=folder, required=True, help="exported folder (ernie-paddle export)")
    p.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per run (default 64)")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of each (default 3)")
    p.add_argument("--json", type=output_file, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)

    def run() -> int:
        from ernie_paddle.ort.runtime import OnnxCausalLM
        from ernie_paddle.text.tokenizer import ErnieTokenizer

        model = OnnxCausalLM(args.model, threads=args.threads)
        ids = ErnieTokenizer(args.model).encode(PROMPT)
        vocab = model.config.vocab_size
        settings = {"plain": GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=[]),
                    "schema": GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=[],
                                               constraint=grammar.folder_schema(args.model, SCHEMA, vocab))}
        decode_rate(model, ids, settings["plain"])  # warm-up
        rates: dict[str, list[float]] = {k: [] for k in settings}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, gen in settings.items():
                rate, tokens[name] = decode_rate(model, ids, gen)
                rates[name].append(rate)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print("| decode | tokens/s (median) | tokens a run |\n|---|---:|---:|")
        for k in settings:
            print(f"| {k} | {med[k]:.2f} | {tokens[k]} |")
        print(f"schema / plain: {med['schema'] / med['plain']:.3f}")
        if args.json:
            from ernie_paddle.benchmarking.setups import machine_meta

            meta = machine_meta(args.threads, model=args.model, schema=SCHEMA, prompt=PROMPT)
            write_json(args.json, {"meta": meta,
                                   "tokens_per_s": rates, "median": med, "tokens": tokens,
                                   "schema_over_plain": round(med["schema"] / med["plain"], 4)})
        return 0

    return run_command(run, "schema_decode")


if __name__ == "__main__":
    sys.exit(main())

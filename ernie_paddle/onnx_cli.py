"""The `ernie-onnx` command line: generate and logits from an exported folder, with ONNX Runtime only.

Same arguments and outputs as `ernie-paddle generate` / `logits`; never imports Paddle.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .cli import generate_args, logits_args, main as _main, run_generate, run_logits


def _load(args):
    from .onnx_runtime import OnnxCausalLM

    return OnnxCausalLM(args.model, provider=args.provider, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-onnx", description="Run an exported ERNIE-4.5 ONNX folder with "
                                "ONNX Runtime (no Paddle needed).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="exported folder (ernie-paddle export)")
        sp.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="ONNX Runtime execution provider")
        sp.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")

    g = sub.add_parser("generate", help="generate tokens from a prompt of token ids")
    common(g)
    generate_args(g)
    g.set_defaults(func=lambda a: run_generate(_load(a), a))
    lg = sub.add_parser("logits", help="write float32 [T, vocab] logits of one forward pass (no cache)")
    common(lg)
    logits_args(lg)
    lg.set_defaults(func=lambda a: run_logits(_load(a), a))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())

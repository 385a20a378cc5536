"""The `ernie-onnx` command line: generate, logits and serve an exported folder, with ONNX Runtime only.

Same arguments and outputs as `ernie-paddle generate` / `logits` / `serve`; never imports Paddle.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ernie_paddle.cli import commands as cli_commands
from ernie_paddle.cli.args import folder, generate_args, logits_args, positive_int, prompt_cache_arg
from ernie_paddle.ort.runtime import PROVIDERS
from ernie_paddle.cli import serve as serve_cli


def _load(args, spinning: bool = True):
    from ernie_paddle.ort.runtime import OnnxCausalLM

    return OnnxCausalLM(args.model, provider=args.provider, threads=args.threads, spinning=spinning)


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", required=True, type=folder, help="exported folder (ernie-paddle export)")
    sp.add_argument("--provider", default="cpu", choices=list(PROVIDERS), help="ONNX Runtime execution provider")
    sp.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: ONNX Runtime's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie-onnx", description="Run an exported ERNIE-4.5 ONNX folder with "
                                "ONNX Runtime (no Paddle needed).")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens from a prompt (text or token ids)")
    _common(g)
    generate_args(g)
    prompt_cache_arg(g)
    g.set_defaults(func=lambda a: cli_commands.generate(_load, a))
    lg = sub.add_parser("logits", help="write float32 [T, vocab] logits of one forward pass (no cache)")
    _common(lg)
    logits_args(lg)
    lg.set_defaults(func=lambda a: cli_commands.logits(_load, a))
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    _common(s)
    serve_cli.server_args(s)
    # a server's ONNX Runtime threads sleep between steps, leaving the cores to the event loop and the clients
    s.set_defaults(func=lambda a: serve_cli.serve(lambda args: _load(args, spinning=False), a))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli_commands.run(sys.argv[1:] if argv is None else argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())

"""Write a checkpoint as a GGUF file for llama.cpp (the writer is `ernie_paddle.export.gguf`).

    python -m ernie_paddle.tools.gguf_export --model DIR --out model-q4_0.gguf --type Q4_0
"""

from __future__ import annotations

import argparse
import sys

from ernie_paddle.export.gguf import TYPES, write_gguf
from ernie_paddle.interrupts import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (-Paddle or -PT layout)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="Q4_0", choices=TYPES, help="type of the matrices (norms and router: F32)")
    args = p.parse_args(argv)
    write_gguf(args.model, args.out, args.type)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "gguf_export"))

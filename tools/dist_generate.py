"""`ernie-paddle generate` / `logits` on several devices: tensor + expert parallelism (`ernie_paddle.paddle.distributed`).

Start one process per device with Paddle's launcher; every process loads only its slice of the checkpoint, all run
the same steps, and only the first prints (and writes --out). The launcher runs a `.py` path or any command:

    python -m paddle.distributed.launch --nproc_per_node 2 python -m ernie_paddle.tools.dist_generate generate \
        --model DIR --input-ids 1,2,3                                                           # CPU (gloo)
    python -m paddle.distributed.launch --devices 0,1,2,3,4,5,6,7 python -m ernie_paddle.tools.dist_generate \
        generate --model DIR --prompt "Hi" --dtype bfloat16                                     # 8 GPUs (NCCL)

Arguments are those of `ernie-paddle generate` / `logits`, plus --ep (1: experts split by width; default: split by
expert id over all processes). The tensor-parallel degree is the number of processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ernie_paddle.cli import commands as cli_commands
from ernie_paddle.cli.args import generate_args, logits_args, paddle_model_args, positive_int


def _load(args):
    from ernie_paddle.paddle import distributed

    plan = distributed.init(ep_degree=args.ep)
    if plan.rank != 0:  # one voice: the other ranks compute silently
        sys.stdout = open(os.devnull, "w")
    if getattr(args, "do_sample", False):
        args.seed = _shared_seed(args.seed, plan)
    model = distributed.from_pretrained_parallel(args.model, plan, dtype=args.dtype, strict_config=args.strict_config,
                                                 allow_pickle=args.allow_pickle)
    return model, plan


def _shared_seed(seed: int | None, plan) -> int | None:
    """Sampling draws on every rank: all need the same seed (the first rank's random one when none is given)."""
    if seed is not None or plan.group is None:
        return seed
    import numpy as np
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor([int(np.random.SeedSequence().generate_state(1)[0] >> 1)], dtype="int64")
    dist.broadcast(t, src=plan.group.ranks[0], group=plan.group)
    return int(t.item())


def cmd_generate(args) -> int:
    return cli_commands.generate(lambda a: _load(a)[0], args)


def cmd_logits(args) -> int:
    model, plan = _load(args)
    if plan.rank == 0:
        return cli_commands.logits(lambda a: model, args)
    import numpy as np

    model.logits(np.asarray(args.input_ids, dtype=np.int64))  # the same collectives as rank 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_generate", description="ERNIE-4.5 generation / logits over several "
                                "processes (run under `python -m paddle.distributed.launch`).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        paddle_model_args(sp, distributed=True)
        sp.add_argument("--ep", type=positive_int, default=None,
                        help="expert-parallel degree: the number of processes (default; experts split by id) "
                             "or 1 (every expert split by width)")

    g = sub.add_parser("generate", help="generate tokens from a prompt")
    common(g)
    generate_args(g)
    g.set_defaults(func=cmd_generate)
    lg = sub.add_parser("logits", help="write float32 [T, vocab] logits of one forward pass (first rank writes)")
    common(lg)
    logits_args(lg)
    lg.set_defaults(func=cmd_logits)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli_commands.run(sys.argv[1:] if argv is None else argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())

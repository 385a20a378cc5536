"""Benchmark one ERNIE MoE layer on CPU: the sorted-grouped expert pass against the per-expert mask loop.

Runs Paddle's `SparseMoeBlock` (router included) at the 21B-A3B widths by default (hidden 2560, 64 experts
of width 1536, top-6, 2 shared) for several token counts, checks that both passes agree, and prints a table
(min wall and CPU milliseconds over repeats) plus the ratio; `--json` writes the figures.

    python -m ernie_paddle.tools.bench_moe --tokens 1,16,128,512 --json moe.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ernie_paddle.atomic import write_json
from ernie_paddle.cli.args import non_negative_int, positive_int, positive_int_list
from ernie_paddle.interrupts import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default=[1, 16, 128, 512], type=positive_int_list,
                   help="comma-separated token counts (default 1,16,128,512)")
    p.add_argument("--preset", default="21b-a3b", help="config preset giving the layer widths")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from ernie_paddle.config import preset
    from ernie_paddle.paddle.modeling import SparseMoeBlock

    import paddle

    cfg = preset(args.preset)
    paddle.seed(args.seed)
    t0 = time.time()
    block = SparseMoeBlock(cfg)
    block.e_score_correction_bias.set_value(paddle.uniform([cfg.moe_num_experts], min=-0.05, max=0.05))
    print(f"# {args.preset} MoE layer: hidden {cfg.hidden_size}, {cfg.moe_num_experts} experts x "
          f"{cfg.moe_intermediate_size}, top-{cfg.moe_k}, {cfg.moe_num_shared_experts} shared; "
          f"built in {time.time() - t0:.1f}s; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE')}", file=sys.stderr)
    rows = []
    for n in args.tokens:
        x = paddle.randn([n, cfg.hidden_size])
        row = {"tokens": n}
        outs = {}
        for name in ("sorted", "mask-loop"):
            block.set_expert_pass(name)
            outs[name] = block(x).numpy()  # warm-up
            wall, cpu = [], []
            for _ in range(args.repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                block(x).numpy()
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            row[name] = {"wall_ms": 1e3 * min(wall), "cpu_ms": 1e3 * min(cpu)}
        row["max_abs_diff"] = float(np.abs(outs["sorted"] - outs["mask-loop"]).max())
        row["speedup_wall"] = row["mask-loop"]["wall_ms"] / row["sorted"]["wall_ms"]
        rows.append(row)

    print(f"{'tokens':>6} | {'sorted ms (wall/cpu)':>21} | {'mask loop ms (wall/cpu)':>24} | {'loop/sorted':>11} | "
          f"max|diff|")
    for r in rows:
        s, m = r["sorted"], r["mask-loop"]
        print(f"{r['tokens']:>6} | {s['wall_ms']:>10.1f} /{s['cpu_ms']:>9.1f} | {m['wall_ms']:>11.1f} /"
              f"{m['cpu_ms']:>11.1f} | {r['speedup_wall']:>10.2f}x | {r['max_abs_diff']:.1e}")
    if args.json:
        from ernie_paddle.benchmarking.setups import machine_meta

        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)  # what Paddle's CPU kernels use
        meta = machine_meta(threads, preset=args.preset, repeats=args.repeats,
                            mkl_debug_cpu_type=os.environ.get("MKL_DEBUG_CPU_TYPE"), paddle=paddle.__version__)
        write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":  # bad input, Ctrl-C, SIGTERM: cleanup runs, one line and a status (run_command)
    sys.exit(run_command(main, "bench_moe"))

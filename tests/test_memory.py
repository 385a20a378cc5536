"""The memory planner: its two fitted constants against the measurements they were fitted to, and the planner against
measurements held out of that fit.

Every figure is a measurement made in this project (2 cores, 24 GB, ONNX Runtime, int4 exports at the 21B-A3B
widths, `accuracy_level` 4, 2 threads). The git history fixes which came first: PACKED_BLOCK_BYTES and ORT_RUNTIME
were set (commit ddf2ae7) from FIT_WEIGHTS and FIT_PEAK; the block-64 runs were measured afterwards (eaa4bfd, 032ed58)
and changed no constant. The 8K run did shape one rule (ONNX Runtime's attention scores: one head per thread), so it
is checked with the fit set, not counted as held out.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from ernie_paddle import memory
from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.config import ErnieConfig, preset
from ernie_paddle.errors import InputError
from ernie_paddle.memory import GPUS, plan_memory, report
from ernie_paddle.sizes import parse_size

from conftest import run_cli

GIB = 2**30

# Resident weights (RssAnon, GB, after load): (layers, block, GB). PACKED_BLOCK_BYTES is their least-squares fit.
FIT_WEIGHTS = ((4, 32, 2.374), (4, 64, 1.871), (4, 128, 1.628), (28, 32, 18.56))
# `ernie-onnx generate`, 28 layers, block 32, 16 prompt + 64 new tokens: peak RSS, GiB. ORT_RUNTIME is what it leaves
# beyond the planned weights, KV cache and working memory.
FIT_PEAK = (32, 80, 17.96)
# Shaped the working-memory rule (see the module docstring): block 64, 8176 + 16 tokens, GiB.
SHAPED_PEAK = (64, 8192, 16.049)
# Held out: `ernie-onnx generate` on the block-64 export, 16 + 64 and 32752 + 16 tokens, peak RSS GiB.
HELD_OUT = ((64, 80, 14.196), (64, 32768, 19.268))


def _counts(layers: int, block: int) -> tuple[int, int]:
    """(planned weight bytes without the per-block term, number of quantisation blocks) of a FIT_WEIGHTS export."""
    cfg = preset("21b-a3b", num_hidden_layers=layers)
    saved = memory.PACKED_BLOCK_BYTES
    try:
        memory.PACKED_BLOCK_BYTES = 0.0
        base = plan_memory(cfg, "int4", 16, block=block).weights
        memory.PACKED_BLOCK_BYTES = 1.0
        blocks = plan_memory(cfg, "int4", 16, block=block).weights - base
    finally:
        memory.PACKED_BLOCK_BYTES = saved
    return base, blocks


def _fit_residual() -> float:
    """The largest relative residual of the planned weights over FIT_WEIGHTS."""
    return max(abs(plan_memory(preset("21b-a3b", num_hidden_layers=layers), "int4", 16, block=block).weights
                   / (gb * 1e9) - 1) for layers, block, gb in FIT_WEIGHTS)


def test_constants_are_their_fit_to_the_named_measurements():
    counts = [_counts(layers, block) for layers, block, _ in FIT_WEIGHTS]
    x = np.array([n for _, n in counts], float)
    y = np.array([gb * 1e9 - base for (_, _, gb), (base, _) in zip(FIT_WEIGHTS, counts)])
    assert memory.PACKED_BLOCK_BYTES == pytest.approx(x @ y / (x @ x), abs=0.005)  # least squares: 11.197
    assert _fit_residual() < 0.012  # 1.17% (4 layers, block 32); the others within 0.4%
    block, context, gib = FIT_PEAK
    p = plan_memory(preset("21b-a3b"), "int4", context=context, block=block, threads=2, kv_cache="fp32")
    implied = gib * GIB - (p.total - p.runtime)  # 0.62 GiB
    assert abs(memory.ORT_RUNTIME - implied) < 0.1 * GIB  # stated as 0.7 GiB
    block, context, gib = SHAPED_PEAK
    p = plan_memory(preset("21b-a3b"), "int4", context=context, block=block, threads=2, kv_cache="fp32")
    assert p.total / GIB == pytest.approx(gib, rel=0.03)  # -2.5%


def test_planner_predicts_held_out_measurements():
    # Weights are 95% of the short-context peak. Out of sample we allow twice the fit's largest residual on the total
    # (2.3%): the held-out 80-token run is +2.0% off, a block size (64) and depth (28) no fitted point combines.
    bound = 2 * _fit_residual()
    assert bound <= 0.03  # never looser than the bound this test had before the fit was separated
    (block, context, gib), (block32k, context32k, gib32k) = HELD_OUT
    p = plan_memory(preset("21b-a3b"), "int4", context=context, block=block, threads=2, kv_cache="fp32")
    assert p.total / GIB == pytest.approx(gib, rel=bound)
    # At 32K the KV cache and attention working memory (arithmetic, no fitted constant) are a fifth of the peak, and
    # the planner underestimates their growth (80 -> 32K tokens: planned 4.1 GiB, measured 5.1 GiB). The fit cannot
    # justify a bound here: 4% is the bound docs/long-context.md states ("planner within 4%"); measured -3.4%.
    p32k = plan_memory(preset("21b-a3b"), "int4", context=context32k, block=block32k, threads=2,
                       kv_cache="fp32")
    assert p32k.total / GIB == pytest.approx(gib32k, rel=0.04)


def test_planner_predicts_the_long_context_benchmark_for_both_caches():
    """Held out too: `tools/context_compare` at the full shape (block 64, 2 threads; docs/context-21b-a3b.json),
    fp32 and int8 KV caches, 512 to 32K tokens, each the peak RSS of its own process. Measured after every constant
    was set; the plan sits 2.6-3.9% above them. The 4% bound is the docs', as for the 32K run above."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "context-21b-a3b.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = [r for r in data["results"] if r.get("engine") == "ort" and "error" not in r]
    caches = {r["kv_cache"] for r in rows}
    assert caches == {"float32", "int8"} and len(rows) == 8, (caches, len(rows))  # 4 contexts per cache
    for r in rows:
        assert "b64" in r["label"]
        p = plan_memory(preset("21b-a3b"), "int4", context=r["context"] + data["meta"]["decode"], block=64,
                        threads=2, kv_cache="int8" if r["kv_cache"] == "int8" else "fp32")
        assert p.total / GIB == pytest.approx(r["peak_rss_gib"], rel=0.04), r


def test_planner_arithmetic_no_fitted_constant():
    # bf16 weights are 2 bytes per parameter (21.8 B) with the fp32 router island
    assert plan_memory(preset("21b-a3b"), "bf16", 1).weights / 1e9 == pytest.approx(43.66, rel=0.01)
    # the shipped model's fp32 safetensors file is its fp32 weights (plus a small header)
    shipped = os.path.join(default_model_dir(), "model.safetensors")
    cfg = ErnieConfig.from_file(default_model_dir())
    assert plan_memory(cfg, "fp32", 1).weights == pytest.approx(os.path.getsize(shipped), rel=0.001)
    # KV cache: layers x 2 x kv heads x head_dim x tokens x 4 bytes
    assert plan_memory(preset("21b-a3b"), "fp32", 8192).kv_cache == 28 * 2 * 4 * 128 * 8192 * 4
    # the int8 cache (export's default for int weights; `--kv-cache`) is one byte an element: 1.75 GiB less at 8K
    assert plan_memory(preset("21b-a3b"), "int4", 8192).kv_cache == 28 * 2 * 4 * 128 * 8192 * 1
    assert plan_memory(preset("21b-a3b"), "int4", 8192, kv_cache="fp32").kv_cache == 28 * 2 * 4 * 128 * 8192 * 4
    # int8 routed experts are per channel (precisions.expert_block): one block per K-long row, not per 32 weights
    one = preset("21b-a3b", num_hidden_layers=2)
    per_channel = plan_memory(one, "int8", 16, block=32).weights
    assert plan_memory(one, "int8", 16, block=16).weights - per_channel < \
        plan_memory(one, "int4", 16, block=16).weights - plan_memory(one, "int4", 16, block=32).weights


@pytest.mark.parametrize("kwargs,flag", [(dict(context=0), "--context"), (dict(context=-5), "--context"),
                                         (dict(batch=0), "--batch"), (dict(block=7), "--block-size"),
                                         (dict(block=48), "--block-size"), (dict(precision="int3"), "--precision")])
def test_planner_refuses_bad_arguments_by_name(kwargs, flag):
    args = dict(precision="int4", context=16, batch=1, block=32) | kwargs
    with pytest.raises(InputError, match=f"^{flag} "):
        plan_memory(preset("tiny"), **args)


def test_report_says_its_units():
    cfg = preset("21b-a3b")
    text = report(cfg, "int4", 8192, 1, parse_size("24GB"), block=64)
    assert "fits 24 GB (22.35 GiB): yes" in text  # 24GB is 24e9 bytes (sizes.parse_size), 15.7 GiB planned
    assert "fits 16 GB (14.9 GiB): no" in report(cfg, "int4", 8192, 1, parse_size("16GB"), block=64)
    assert GPUS["A100-80GB"] == 80 * 10**9 and GPUS["T4"] == parse_size("16GB")
    assert "(GPU memory as sold: 1 GB = 1e9 bytes)" in report(cfg, "bf16", 8192, 1, None)


def test_memory_cli():
    r = run_cli("memory", "--preset", "21b-a3b", "--precision", "int4", "--context", "8192",
                "--device-memory", "24GiB")
    assert r.returncode == 0 and "fits 25.77 GB (24 GiB): yes" in r.stdout and "KV cache" in r.stdout
    r = run_cli("memory", "--preset", "21b-a3b", "--precision", "bf16", "--context", "8192")
    assert "fits: A100-80GB, H100, H200" in r.stdout
    r = run_cli("memory", "--precision", "int4", "--context", "16")
    assert r.returncode == 2 and "give exactly one of --model DIR or --preset NAME" in r.stderr


def test_the_prefix_cache_is_counted_in_the_plan():
    cfg = preset("21b-a3b")
    none, pool = plan_memory(cfg, "int4", 8192), plan_memory(cfg, "int4", 8192, prefix_cache_memory=GIB)
    assert pool.total - none.total == pool.prefix_cache == GIB and none.prefix_cache == none.prefix_tokens == 0
    # the int8 cache's codes: 28 layers x 2 x 4 kv heads x 128 x 1 byte = 28672 bytes a token; 1 GiB holds 37449
    # tokens, 37440 in whole blocks of 32 (the pool evicts blocks)
    assert pool.prefix_tokens == 37440
    assert plan_memory(cfg, "int4", 8192, kv_cache="fp32", prefix_cache_memory=GIB).prefix_tokens == 9344  # 9362
    assert plan_memory(cfg, "bf16", 8192, prefix_cache_memory=GIB).prefix_tokens == 9344  # kept widened to fp32
    with pytest.raises(InputError, match=r"^--prefix-cache-memory must be a size >= 0, got -1$"):
        plan_memory(cfg, "int4", 16, prefix_cache_memory=-1)


def test_memory_cli_counts_the_servers_prefix_cache():
    args = ("memory", "--preset", "21b-a3b", "--precision", "int4", "--context", "8192")
    default, off = run_cli(*args), run_cli(*args, "--prefix-cache-memory", "0")
    assert default.returncode == off.returncode == 0
    # the server's default (1 GiB) is in the total; every other line is the same
    assert "  prefix cache       1.00 GiB  (37440 tokens of prefix, serve --prefix-cache-memory)\n" in default.stdout
    assert "  prefix cache       0.00 GiB  (off)\n" in off.stdout
    total = lambda r: float(re.search(r"^  total +([0-9.]+) GiB$", r.stdout, re.M).group(1))  # noqa: E731
    assert total(default) - total(off) == pytest.approx(1.0, abs=0.011)
    same = lambda r: [x for x in r.stdout.splitlines() if "prefix cache" not in x and "total" not in x]  # noqa: E731
    assert same(default) == same(off)
    r = run_cli(*args, "--prefix-cache-memory", "512MiB")
    assert "  prefix cache       0.50 GiB  (18720 tokens of prefix, serve --prefix-cache-memory)\n" in r.stdout

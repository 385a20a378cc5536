"""The memory planner against sizes measured in this project's runs."""

from __future__ import annotations

import os

import pytest

from ernie_paddle.cli import default_model_dir
from ernie_paddle.config import preset
from ernie_paddle.memory import plan

from conftest import run_cli

GIB = 2**30


def test_planner_matches_measured_sizes():
    # ONNX Runtime resident memory after prepacking, measured (RssAnon, GB) on exports at the 21B-A3B widths, int4,
    # accuracy_level 4: 4 layers with blocks of 32 / 64 / 128, and all 28 layers with blocks of 32
    for layers, block, measured in ((4, 32, 2.374), (4, 64, 1.871), (4, 128, 1.628), (28, 32, 18.56)):
        p = plan(preset("21b-a3b", num_hidden_layers=layers), "int4", context=16, block=block)
        assert p.weights / 1e9 == pytest.approx(measured, rel=0.02), (layers, block)
    # `ernie-onnx generate` on the 28-layer block-32 export: 17.96 GiB peak RSS (16 prompt + 64 new tokens)
    assert plan(preset("21b-a3b"), "int4", context=80, threads=2).total / GIB == pytest.approx(17.96, rel=0.03)
    # block 64 (the README's 21B commands), 2 threads: `ernie-onnx generate` with 16 + 64, 8176 + 16 and 32752 + 16
    # tokens
    for context, measured, rel in ((80, 14.196, 0.03), (8192, 16.049, 0.03), (32768, 19.268, 0.04)):
        p = plan(preset("21b-a3b"), "int4", context=context, block=64, threads=2)
        assert p.total / GIB == pytest.approx(measured, rel=rel), context
    # bf16 weights are 2 bytes per parameter (21.8 B) with the fp32 router island
    assert plan(preset("21b-a3b"), "bf16", 1).weights / 1e9 == pytest.approx(43.66, rel=0.01)
    # the shipped model's fp32 safetensors file is its fp32 weights
    shipped = os.path.join(default_model_dir(), "model.safetensors")
    from ernie_paddle.config import ErnieConfig

    cfg = ErnieConfig.from_file(default_model_dir())
    assert plan(cfg, "fp32", 1).weights == pytest.approx(os.path.getsize(shipped), rel=0.001)
    # KV cache: layers x 2 x kv heads x head_dim x tokens x 4 bytes
    k = plan(preset("21b-a3b"), "fp32", 8192).kv_cache
    assert k == 28 * 2 * 4 * 128 * 8192 * 4


def test_memory_cli():
    r = run_cli("memory", "--preset", "21b-a3b", "--precision", "int4", "--context", "8192",
                "--device-memory", "24GB")
    assert r.returncode == 0 and "fits 24 GiB: yes" in r.stdout and "KV cache" in r.stdout
    r = run_cli("memory", "--preset", "21b-a3b", "--precision", "bf16", "--context", "8192")
    assert "fits: A100-80GB, H100, H200" in r.stdout
    r = run_cli("memory", "--precision", "int4", "--context", "16")
    assert r.returncode == 2 and "give exactly one of --model DIR or --preset NAME" in r.stderr

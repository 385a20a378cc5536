"""Quantisation quality on the shipped trained model (held-out perplexity), with the stated bounds."""

from __future__ import annotations

import pytest

from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.corpus import DEFAULT_CORPUS
from ernie_paddle.tools.quant_quality import run


def test_quantised_perplexity_bounds_and_calibration_beats_rtn(tmp_path):
    report = run(default_model_dir(), DEFAULT_CORPUS, str(tmp_path))
    r = {row["variant"]: row for row in report["results"]}
    fp32 = r["paddle fp32"]["perplexity"]
    assert r["ort fp32"]["perplexity"] == pytest.approx(fp32, rel=1e-5)
    assert r["ort fp32"]["greedy_agreement"] == 1.0
    assert abs(r["ort int8"]["perplexity"] / fp32 - 1) <= 0.005  # int8 within 0.5%
    assert abs(r["ort int4 b32 RTN"]["perplexity"] / fp32 - 1) <= 0.03  # int4 within 3%
    assert abs(r["ort int4 b32 GPTQ"]["perplexity"] / fp32 - 1) <= 0.03
    assert abs(r["ort int4 b64 RTN"]["perplexity"] / fp32 - 1) <= 0.03  # the block the 21B README uses
    assert r["ort int4 b32 GPTQ"]["calibrated_tensors"] > 50
    # at block 128 (half a row of this model) calibration recovers half of RTN's loss: measured +0.78% vs +1.40%
    assert r["ort int4 b128 GPTQ"]["perplexity"] < 0.997 * r["ort int4 b128 RTN"]["perplexity"]
    # the mse block scales (same bytes): measured +0.24% (RTN) and +0.06% (GPTQ) at block 128, RTN absmax +1.40%
    for scheme in ("RTN", "GPTQ"):
        assert abs(r[f"ort int4 b128 {scheme} mse"]["perplexity"] / fp32 - 1) <= 0.01, scheme
    assert r["ort int4 b128 RTN mse"]["perplexity"] < 0.995 * r["ort int4 b128 RTN"]["perplexity"]
    assert r["ort int4 b128 RTN mse"]["weights_mib"] == r["ort int4 b128 RTN"]["weights_mib"]
    # int8 attention projections (the 21B CPU recipe: at random 21B widths they keep the routers' choices closer)
    # are no gain on this trained model: measured +0.96% against +0.24%; bounded at the 21B target plus a margin
    attn8 = r["ort int4 b128 RTN mse attn int8"]
    assert abs(attn8["perplexity"] / fp32 - 1) <= 0.0125 and attn8["attention_precision"] == "int8"
    assert attn8["weights_mib"] > r["ort int4 b128 RTN mse"]["weights_mib"]
    # 2-bit is reported, and the calibrated scheme is measurably better than round-to-nearest
    assert r["ort int2 b32 GPTQ"]["perplexity"] < 0.97 * r["ort int2 b32 RTN"]["perplexity"]
    # the int8 KV cache (the int exports' default) costs at most 1% of perplexity on top of the weights' precision
    for weights in ("ort fp32", "ort int8", "ort int4 b32 RTN", "ort int4 b64 RTN"):
        assert abs(r[f"{weights} + int8 KV"]["perplexity"] / r[weights]["perplexity"] - 1) <= 0.01, weights
    assert r["ort int4 b128 RTN"]["weights_mib"] < r["ort int4 b64 RTN"]["weights_mib"] < r["ort int4 b32 RTN"][
        "weights_mib"] < r["ort int8"]["weights_mib"]


def test_variants_are_chosen_by_label_and_unknown_ones_refused():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.quant_quality", "--variants",
                        "ort int4 b32 RTN,ort int5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "--variants: unknown variant(s) ort int5; choose from ort fp32, ort fp16," in r.stderr

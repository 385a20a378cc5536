"""Smoke test of the benchmark program on the tiny preset (a program, not a timed test: only its output shape)."""

from __future__ import annotations

import json

from conftest import run_cli


def test_bench_tiny_writes_table_json_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--preset", "tiny", "--work", str(tmp_path / "work"), "--engines",
                "paddle,ort-fp32,ort-int4,hf", "--prompt-lengths", "16,32", "--batches", "1,2", "--decode-tokens",
                "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.load(open(out))
    rows = {row["engine"]: row for row in data["results"]}
    assert set(rows) == {"paddle", "ort-fp32", "ort-int4", "hf"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["prefill_tok_s"]["16"] > 0 and row["decode_tok_s"]["2"] > 0 and row["peak_rss_gb"] > 0
    header = r.stdout.splitlines()[0]
    assert "decode b1 / paddle" in header and "decode b1 / llama q4_0" in header
    assert any(line.startswith("paddle |") and "1.00x" in line for line in r.stdout.splitlines())


def test_context_bench_estimates_and_measures(ckpt_factory, tmp_path):
    """tools/context_bench on a tiny ort export: one row per context, the real prefill timed with --full, the
    estimate of the same order (a program: timing is only sanity-checked)."""
    import subprocess
    import sys

    from ernie_paddle.export.pipeline import export

    d, _ = ckpt_factory("context-bench", max_position_embeddings=4096)
    folder = str(tmp_path / "ort")
    export(d, folder, precision="fp32", verify=False)
    out = tmp_path / "ctx.json"
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.context_bench", "--model", folder, "--context",
                        "256,512", "--chunk", "64", "--decode", "4", "--full", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(out))["results"]
    assert [row["context"] for row in rows] == [256, 512]
    for row in rows:
        assert row["decode_tok_s"] > 0 and row["peak_rss_gib"] > 0 and row["first_chunk_s"] > 0
        assert 0 < row["ttft_estimate_s"] < 20 * row["ttft_measured_s"] + 1
    assert r.stdout.count("\n") == 4 and "TTFT estimate s" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.context_bench", "--model", folder, "--context",
                        "8192"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "exceeds max_position_embeddings 4096" in r.stderr

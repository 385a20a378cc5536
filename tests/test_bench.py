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

"""tools/kernel_bench on the tiny widths: a measured layout's row states the bytes its layout stores and MLAS's
packed layout reads per token, a layout the CPU kernel refuses is a row with the kernel's reason, and the JSON holds
what the table prints."""

from __future__ import annotations

import json
import subprocess
import sys

from ernie_paddle.config import preset
from ernie_paddle.memory import packed_bytes


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_paddle.tools.kernel_bench", "--preset", "tiny", *args],
                          capture_output=True, text=True, timeout=600)


def test_rows_state_layout_bytes_and_refusals(tmp_path):
    out = tmp_path / "k.json"
    r = _run("--prompt", "8", "--repeats", "1", "--threads", "1", "--only", "lm_head int4 b32 acc4,int3",
             "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.load(open(out))
    rows = {row["label"]: row for row in data["results"]}
    assert set(rows) == {"MatMulNBits lm_head int4 b32 acc4", "QMoE experts int3 b32 acc4"}
    cfg = preset("tiny")
    k, n = cfg.hidden_size, cfg.vocab_size
    head = rows["MatMulNBits lm_head int4 b32 acc4"]
    assert (head["k"], head["n"]) == (k, n)
    assert head["stored_mb_per_token"] == round((k * n // 2 + k * n // 32 * 4) / 1e6, 2)  # codes + fp32 scales
    assert head["read_mb_per_token"] == round(packed_bytes(k * n, 4, 32) / 1e6, 2)  # what MLAS repacks them to
    assert head["decode_ms"] > 0 and head["prefill_ms"] > 0 and head["prefill_tokens"] == 8
    assert "INT3" in rows["QMoE experts int3 b32 acc4"]["error"]  # the CPU graph is fp32: the kernel says why not
    lines = r.stdout.splitlines()
    assert lines[0].split(" | ")[:3] == ["layout", "stored MB/token", "read MB/token"]
    printed = {line.split(" | ")[0]: line.split(" | ") for line in lines[2:]}
    assert printed["MatMulNBits lm_head int4 b32 acc4"][4] == str(head["decode_ms"])
    assert printed["QMoE experts int3 b32 acc4"][1].startswith("refused: ")
    assert data["meta"]["preset"] == "tiny" and data["meta"]["read_gb_per_s"] > 0


def test_an_unmatched_filter_is_refused():
    r = _run("--only", "int7")
    assert r.returncode == 2
    assert "--only 'int7' matches no layout" in r.stderr

"""tools/attention_bench: the grouped standard-op decode attention equals the fused GroupQueryAttention fp32 op (and a
float64 reference), and the program runs end to end on tiny shapes writing the rows it prints."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ernie_paddle.tools.attention_bench import (ERNIE_21B, FORMS, PREFILL_FORMS, FusedStep, GroupedStep, Shape,
                                                gqa_graph, grouped_graph, prompt_attention_s, random_cache, session,
                                                step_inputs)

# Both forms are fp32 with the same products summed in different orders (head_dim terms per score, T per softmax
# sum and per output channel); the outputs are softmax-weighted means of values of at most ~4. Measured at 1-8192
# slots, each form is within 5e-7 of a float64 reference; 2e-6 is about 17 float32 ulps at 1.0. A wrong slot (one
# key too few) or a lost new-token term moves the output by more than 1e-3 (checked below), far outside it.
TOL = 2e-6


def reference(q, k, v, keys, values, past: int, shape: Shape) -> np.ndarray:
    """Decode attention in float64: the query heads of group h against the KV head h's first `past` slots and the
    new token."""
    nh, nkv, d = shape
    K = np.concatenate([keys[:, :past], k.reshape(nkv, 1, d)], 1).astype(np.float64)
    V = np.concatenate([values[:, :past], v.reshape(nkv, 1, d)], 1).astype(np.float64)
    s = np.einsum("hgd,htd->hgt", q.reshape(nkv, nh // nkv, d).astype(np.float64), K) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hgt,htd->hgd", p / p.sum(-1, keepdims=True), V).reshape(1, 1, nh * d)


@pytest.mark.parametrize("context", [1, 2, 33, 2049])
def test_grouped_form_equals_fused_gqa_fp32(tmp_path, context):
    shape = ERNIE_21B
    rng = np.random.default_rng(context)
    keys, values = random_cache(shape, context, rng)
    fused = FusedStep(session(gqa_graph(shape, str(tmp_path / "gqa.onnx")), 2), keys, values, int8=False)
    grouped = GroupedStep(session(grouped_graph(shape, str(tmp_path / "grouped.onnx")), 2), keys, values)
    q, k, v = step_inputs(shape, rng)
    a, b = fused(q, k, v, context - 1), grouped(q, k, v, context - 1)
    assert a.shape == b.shape == (1, 1, shape.heads * shape.head_dim)
    np.testing.assert_allclose(b, a, rtol=0, atol=TOL)
    r = reference(q, k, v, keys, values, context - 1, shape)
    np.testing.assert_allclose(a, r, rtol=0, atol=TOL)
    np.testing.assert_allclose(b, r, rtol=0, atol=TOL)
    if context > 1:  # the tolerance tells a slot too few apart
        assert np.abs(grouped(q, k, v, context - 2) - a).max() > 1e-3


def test_int8_fused_step_is_the_same_attention(tmp_path):
    """The int8 row times the same attention: codes at scale INT8_SCALE (0.04) round each key/value by at most
    0.02, so the output stays within a few hundredths of the fp32 op's (a wrong cache would be off by ~1)."""
    shape = Shape(4, 2, 32)
    rng = np.random.default_rng(0)
    keys, values = random_cache(shape, 64, rng)
    fp32 = FusedStep(session(gqa_graph(shape, str(tmp_path / "a.onnx")), 1), keys, values, int8=False)
    int8 = FusedStep(session(gqa_graph(shape, str(tmp_path / "b.onnx"), int8=True), 1), keys, values, int8=True)
    q, k, v = step_inputs(shape, rng)
    assert np.abs(int8(q, k, v, 63) - fp32(q, k, v, 63)).max() < 0.05


def test_program_writes_table_and_json(tmp_path):
    out = tmp_path / "attention.json"
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.attention_bench", "--heads", "4", "--kv-heads",
                        "2", "--head-dim", "16", "--context", "8,64", "--prefill-chunks", "4,16", "--prefill-context",
                        "16,64", "--repeats", "2", "--threads", "1", "--layers", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.load(open(out))
    assert data["meta"]["shape"] == {"heads": 4, "kv_heads": 2, "head_dim": 16}
    assert [(row["context"], row["form"]) for row in data["decode"]] == [(n, f) for n in (8, 64) for f in FORMS]
    for row in data["decode"]:
        bytes_per = 1 if row["form"] == "gqa-int8" else 4
        assert row["ms"] > 0 and row["gb_s"] == pytest.approx(2 * 2 * row["context"] * 16 * bytes_per /
                                                              (row["ms"] / 1e3) / 1e9, rel=0.05, abs=0.011)
    assert [(row["form"], row["chunk"], row["context"]) for row in data["prefill"]] == [
        (f, c, n) for f in PREFILL_FORMS for n in (16, 64) for c in (4, 16)]
    for row in data["prefill"]:
        assert row["ms"] > 0 and row["peak_rss_gib"] > 0
        assert row["probs_matrix_gib"] == round(4 * 4 * row["chunk"] * row["context"] / 2**30, 3)
        n = -(-row["context"] // row["chunk"])  # 3 layers; n chunks cost n^2/2 chunk-halves, the last n - 1/2
        assert row["prompt_attention_s"] == pytest.approx(3 * row["ms"] / 1e3 * n * n / (2 * n - 1), abs=0.051)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| context | gqa-fp32 ms | gqa-fp32 GB/s | gqa-int8 ms")
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| 8", "| 64"]


def test_bad_head_counts_are_refused():
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.attention_bench", "--heads", "5", "--kv-heads", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("error: argument --heads: 5 is not a multiple of --kv-heads 2")


def test_prompt_attention_estimate():
    """Chunk i's queries read (i + 1/2) chunks of slots on average: 64 chunks cost 64^2/2 = 2048 such units, the
    last one 63.5 of them; one chunk is the whole prompt; two cost 2 / 1.5 of the last one."""
    assert prompt_attention_s(512, 32768, 63.5, 28) == pytest.approx(28 * 2048)
    assert prompt_attention_s(512, 512, 2.0, 1) == 2.0
    assert prompt_attention_s(512, 1000, 1.5, 1) == pytest.approx(2.0)  # a partial last chunk is still a chunk

"""`ernie-paddle parity`: the report's numbers on a random checkpoint, its JSON and its plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ernie_paddle.export import pipeline

from conftest import run_cli


def test_parity_report_fp32_int4_and_transformers(tiny_ckpt, tmp_path):
    d, cfg = tiny_ckpt
    fp32, int4 = str(tmp_path / "fp32"), str(tmp_path / "int4")
    pipeline.export(d, fp32)
    pipeline.export(d, int4, precision="int4", verify=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5,6,7,8,9,10,11\n100,200,300\n")
    out, png = tmp_path / "parity.json", tmp_path / "parity.png"
    temp = tmp_path / "temp"
    temp.mkdir()
    exported = {f: sorted(os.listdir(f)) for f in (fp32, int4)}
    r = run_cli("parity", "--model", d, "--onnx", fp32, "--onnx", int4, "--hf", "--prompts", str(prompts),
                "--greedy-tokens", "12", "--json", str(out), "--plot", str(png), env={"TMPDIR": str(temp)})
    assert r.returncode == 0, r.stderr
    # nothing left behind: no probe graph in the export folders, no fp32 -PT copy or probe graph in the temp folder
    assert {f: sorted(os.listdir(f)) for f in (fp32, int4)} == exported
    assert [f for f in os.listdir(temp) if f.startswith("ernie-parity-")] == []  # (torch leaves its own caches)
    report = json.load(open(out))
    assert report["prompt_tokens"] == [7, 3] and report["moe_layers"] == [1, 2]
    assert all(0.0 <= x <= 1.0 for x in report["bias_changed_choice"])
    by_name = {c["name"].split(" ")[0]: c for c in report["candidates"]}
    onnx_fp32, onnx_int4, hf = by_name["onnx:fp32"], by_name["onnx:int4"], by_name["transformers"]
    for c in (onnx_fp32, hf):
        assert c["logits_max_abs_diff"] <= 1e-4 and c["top1_agreement"] == 1.0
        assert c["greedy_identical_tokens"] == [12, 12] and c["router_agreement"] == [1.0, 1.0]
        assert len(c["hidden_max_abs_diff"]) == cfg.num_hidden_layers + 1
        assert max(c["hidden_max_abs_diff"]) <= 1e-4 and c["kl_divergence"] <= 1e-6
        # fp32 in another summation order: measured 7e-7 of the logits' RMS (int4's rounding: 0.3)
        assert c["logits_relative_rms"] <= 1e-5
    assert onnx_int4["logits_max_abs_diff"] > 1e-2 and onnx_int4["logits_relative_rms"] > 1e-2 and min(onnx_int4["router_agreement"]) < 1.0
    assert np.isfinite(onnx_int4["kl_divergence"]) and onnx_int4["kl_divergence"] > 1e-4
    assert "per layer max |diff|" in r.stdout and "onnx:fp32 (ort fp32)" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_by_layer_reference_gives_the_same_report(tiny_ckpt, tmp_path):
    from ernie_paddle.parity import run as parity

    d, cfg = tiny_ckpt
    folder = str(tmp_path / "int4")
    pipeline.export(d, folder, precision="int4", verify=False)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300, 400]]
    whole = parity.run(d, [folder], False, prompts, greedy_tokens=10, streaming=False)
    streamed = parity.run(d, [folder], False, prompts, greedy_tokens=10, streaming=True)
    assert streamed["reference"] == "paddle fp32, layer by layer"
    a, b = whole["candidates"][0], streamed["candidates"][0]
    assert a["greedy_identical_tokens"] == b["greedy_identical_tokens"]
    assert a["router_agreement"] == b["router_agreement"] and a["top1_agreement"] == b["top1_agreement"]
    assert np.allclose(a["hidden_max_abs_diff"], b["hidden_max_abs_diff"], atol=1e-4)
    assert abs(a["logits_max_abs_diff"] - b["logits_max_abs_diff"]) <= 1e-4
    assert np.allclose(whole["bias_changed_choice"], streamed["bias_changed_choice"])


@pytest.mark.parametrize("tied", [False, True])
def test_layer_by_layer_reference_runs_the_whole_models_forward(ckpt_factory, tied):
    """Both references run the model's own forward pieces, so their traces are the same numbers, not merely close."""
    from ernie_paddle.paddle.reference import reference_traces

    d, cfg = ckpt_factory(f"tiny-tied-{tied}", tie_word_embeddings=tied, seed=11)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300, 400]]
    (whole, whole_changed), (streamed, streamed_changed) = (reference_traces(d, cfg, seqs, streaming)
                                                            for streaming in (False, True))
    assert whole_changed == streamed_changed
    for a, b in zip(whole, streamed):
        assert np.array_equal(a.logits, b.logits)
        assert len(a.hidden) == len(b.hidden) == cfg.num_hidden_layers + 1
        assert all(np.array_equal(x, y) for x, y in zip(a.hidden, b.hidden))
        assert all(np.array_equal(x, y) for x, y in zip(a.experts, b.experts))


def test_parity_refuses_a_missing_gguf_before_loading_anything(tiny_ckpt, tmp_path):
    d, _ = tiny_ckpt
    r = run_cli("parity", "--model", d, "--gguf", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--gguf: {tmp_path / 'missing.gguf'}: no such file" in r.stderr


def test_parity_refuses_what_cannot_run_before_loading_a_model(tiny_ckpt, tmp_path, monkeypatch):
    import importlib.util

    from ernie_paddle.parity import run as parity
    from ernie_paddle.errors import InputError

    d, _ = tiny_ckpt
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    with pytest.raises(InputError, match=r"--gguf needs llama-cpp-python \(pip install llama-cpp-python"):
        parity.run(d, [], False, [[5, 6, 7]], 4, gguf_files=[str(gguf_file)])
    with pytest.raises(InputError, match="--hf needs the whole fp32 model in memory; it is too large here"):
        parity.run(d, [], True, [[5, 6, 7]], 4, streaming=True)

"""`export --attention-precision`: the self-attention projections quantised apart from the other weights."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from ernie_paddle.errors import ExportError


def _bits_by_node(folder: str) -> dict[str, int]:
    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type == "MatMulNBits"}


def test_int8_attention_in_an_int4_export_is_exact_against_its_round_trip(ckpt_factory, tmp_path):
    from ernie_paddle.checkpoint.folder import read_canonical, write_checkpoint
    from ernie_paddle.export.pipeline import export
    from ernie_paddle.export.quantize import round_trip
    from ernie_paddle.export.verify import compare
    from ernie_paddle.ort.runtime import OnnxCausalLM
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    d, cfg = ckpt_factory("attention-int8", seed=21, tie_word_embeddings=False)
    out = str(tmp_path / "int4-attn8")
    export(d, out, precision="int4", verify=False, kv_cache="fp32", attention_precision="int8")
    bits = _bits_by_node(out)
    attention = {n for n in bits if ".self_attn." in n}
    assert len(attention) == 2 * cfg.num_hidden_layers
    assert {bits[n] for n in attention} == {8} and {b for n, b in bits.items() if n not in attention} == {4}
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert (manifest["precision"], manifest["attention_precision"]) == ("int4", "int8")
    ref_dir = str(tmp_path / "dequantized")
    write_checkpoint(cfg, ((m.canonical, round_trip(m, a, 4, 32, attention_bits=8)) for m, a in
                           read_canonical(d, cfg)), ref_dir, dtype="float32")
    rng = np.random.default_rng(4)
    figures = compare(Ernie4_5_MoeForCausalLM.from_pretrained(ref_dir), OnnxCausalLM(out),
                      [rng.integers(3, cfg.vocab_size, 12).tolist()], greedy_tokens=16)
    assert figures["max_abs_logit_diff"] <= 1e-4 and figures["greedy_identical_prompts"] == 1
    # without the option every projection has the weights' bits, and the manifest says so
    plain = str(tmp_path / "int4")
    export(d, plain, precision="int4", verify=False, kv_cache="fp32")
    assert set(_bits_by_node(plain).values()) == {4}
    assert json.load(open(os.path.join(plain, "manifest.json")))["attention_precision"] == "int4"


@pytest.mark.parametrize("flavor, precision, attention", [("ort", "fp32", "int8"), ("portable", "fp32", "int8"),
                                                          ("ort", "int4", "fp16")])
def test_attention_precision_is_refused_where_it_has_no_meaning(tiny_ckpt, tmp_path, flavor, precision, attention):
    from ernie_paddle.export.pipeline import export

    out = tmp_path / "refused"
    with pytest.raises(ExportError) as e:
        export(tiny_ckpt[0], str(out), flavor=flavor, precision=precision, attention_precision=attention)
    assert str(e.value) == (f"--attention-precision {attention}: the attention projections of an ort export with "
                            f"int8/int4/int2 weights take one of int8, int4, int2; got --flavor {flavor} --precision "
                            f"{precision}")
    assert not out.exists()


def test_cli_attention_precision(tmp_path, capsys):
    from ernie_paddle.cli.paddle_cli import main

    out = str(tmp_path / "shipped-attn8")
    assert main(["export", "--out", out, "--precision", "int4", "--block-size", "128", "--attention-precision",
                 "int8", "--no-verify"]) == 0
    assert {b for n, b in _bits_by_node(out).items() if ".self_attn." in n} == {8}
    assert main(["export", "--out", str(tmp_path / "fp32"), "--attention-precision", "int8"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --attention-precision int8: the attention projections of an ort export with int8/int4/int2 weights "
        "take one of int8, int4, int2; got --flavor ort --precision fp32")
    assert not os.path.exists(tmp_path / "fp32")

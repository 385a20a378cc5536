"""The int8 KV cache (`export --kv-cache int8`, the integer exports' default): the graph it writes, calibration that
leaves the calibration text unclipped, its cost in perplexity on the shipped model, and continuous batching over it."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.corpus import held_out_text
from ernie_paddle.errors import ExportError
from ernie_paddle.export import pipeline
from ernie_paddle.export.kv_cache import MARGIN, calibration_ids
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.scoring import perplexity
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.serving.engine import Engine, Request, Token
from ernie_paddle.text.tokenizer import ErnieTokenizer


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped model exported in fp32 weights with the fp32 and the int8 cache, and int4 by default."""
    work = tmp_path_factory.mktemp("kv")
    out = {}
    for name, precision, kv in (("fp32", "fp32", "fp32"), ("kv8", "fp32", "int8"), ("int4", "int4", "auto")):
        out[name] = str(work / name)
        pipeline.export(default_model_dir(), out[name], precision=precision, kv_cache=kv, verify=False)
    return out


def test_the_graph_holds_an_int8_cache_and_auto_picks_it_for_int_weights(shipped):
    for name, kv in (("fp32", "fp32"), ("kv8", "int8"), ("int4", "int8")):
        assert json.load(open(os.path.join(shipped[name], "manifest.json")))["kv_cache"] == kv
    graph = onnx.load(os.path.join(shipped["kv8"], "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert types["past_key_values.0.key"] == types["present.3.value"] == onnx.TensorProto.INT8
    # each attention is an If on the step: the int8 op decodes, prefill writes codes and attends in fp32
    steps = [n for n in graph.node if n.op_type == "If"]
    assert [n.name for n in steps] == [f"layers.{i}.self_attn" for i in range(4)]  # the shipped model's layers
    branches = {a.name: a.g for a in steps[0].attribute}
    (gqa,) = branches["else_branch"].node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
    assert list(gqa.input[12:]) == ["layers.0.self_attn.k_scale", "layers.0.self_attn.v_scale"]
    prefill = [n.op_type for n in branches["then_branch"].node]
    assert prefill.count("TensorScatter") == 2 and prefill.count("GroupQueryAttention") == 1
    fp32 = next(n for n in branches["then_branch"].node if n.op_type == "GroupQueryAttention")
    assert "k_quant_type" not in {a.name for a in fp32.attribute}
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_scale")}
    assert len(scales) == 2 * len(steps) and all(s.shape == (2 * 64,) and (s > 0).all() for s in scales.values())
    assert OnnxCausalLM(shipped["kv8"]).kv_dtype == np.int8


def test_calibration_text_is_never_clipped(shipped):
    """Keys get their rotary pair's norm, values their largest magnitude, times MARGIN: run through the int8 model,
    the calibration text's cached codes stay within round(127 / MARGIN) = 102 (none saturates at +-127)."""
    model = OnnxCausalLM(shipped["kv8"])
    for ids in calibration_ids(default_model_dir(), model.config.vocab_size):
        cache = model.allocate_cache(1, len(ids))
        model(ids[None], cache=cache)
        codes = max(int(np.abs(kv.numpy()).max()) for layer in cache.layers for kv in layer)
        assert 95 <= codes <= round(127 / MARGIN)  # codes are rounded; the largest sits near the bound: tight scales


def test_int8_cache_costs_under_one_percent_of_perplexity(shipped):
    ids = np.array(ErnieTokenizer(default_model_dir()).encode(held_out_text()), np.int64)
    segments = [ids[s:s + 1024] for s in (0, 5000, 20000)]  # measured +0.46%, +0.09%, -0.03%
    for seg in segments:
        base = perplexity(OnnxCausalLM(shipped["fp32"]).logits, seg)
        assert abs(perplexity(OnnxCausalLM(shipped["kv8"]).logits, seg) / base - 1) <= 0.01


def test_continuous_batching_over_int8_rows_equals_each_alone(shipped):
    model = OnnxCausalLM(shipped["int4"])
    tok = ErnieTokenizer(shipped["int4"])
    texts = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING RICHARD III:",
             "To be, or not to be: that is the question:", "MENENIUS:\nWhat work's, my countrymen, in hand?"]
    engine = Engine(model, max_batch=3)
    made = []
    for i, t in enumerate(texts):
        got: list[int] = []
        made.append((Request(tok.encode(t), GenerationConfig(max_new_tokens=12 + 4 * i, eos_token_ids=[],
                                                               prefill_chunk=8),
                             lambda e, got=got: got.append(e.id) if isinstance(e, Token) else None), got))
    pending = [r for r, _ in made]
    while pending or not engine.idle():
        if pending and engine.steps % 2 == 0:
            engine.submit(pending.pop(0))
        engine.step()
    for r, got in made:  # rows that move carry their int8 codes with them
        assert got == generate(model, r.prompt, r.gen)


def test_prefix_reuse_over_int8_rows_equals_each_alone(shipped):
    """The prefix cache keeps int8 codes: a second speech sharing the first's opening reuses its blocks and gives
    the tokens it gives alone."""
    model = OnnxCausalLM(shipped["kv8"])
    tok = ErnieTokenizer(shipped["kv8"])
    opening = tok.encode(held_out_text()[:2000])[:70]
    prompts = [opening + tok.encode(" Speak."), opening + tok.encode(" Hear me, my lord.")]
    engine = Engine(model, max_batch=2)
    got: list[list[int]] = [[], []]
    reqs = [Request(p, GenerationConfig(max_new_tokens=12, eos_token_ids=[], prefill_chunk=24),
                    lambda e, out=out: out.append(e.id) if isinstance(e, Token) else None)
            for p, out in zip(prompts, got)]
    for r in reqs:
        engine.submit(r)
        while not engine.idle():
            engine.step()
    assert engine.prefix.blocks and all(b.kv[0][0].dtype == np.int8 for b in engine.prefix.blocks.values())
    assert [r.cached_tokens for r in reqs] == [0, 64]
    for r, out in zip(reqs, got):
        assert out == generate(model, r.prompt, r.gen)


def test_int8_cache_needs_the_ort_flavour(tmp_path):
    with pytest.raises(ExportError, match=r"^--kv-cache int8 is GroupQueryAttention's quantised cache: the ort "
                                          r"flavour only$"):
        pipeline.export(default_model_dir(), str(tmp_path / "x"), flavor="portable", kv_cache="int8")
    with pytest.raises(ExportError, match=r"^--kv-cache must be one of auto, fp32, int8, got 'int4'$"):
        pipeline.export(default_model_dir(), str(tmp_path / "x"), kv_cache="int4")

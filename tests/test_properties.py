"""Property tests: over random ERNIE geometries, Paddle and ONNX Runtime (`ort` fp32) agree."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ernie_paddle.checkpoint.folder import make_checkpoint
from ernie_paddle.config import ErnieConfig
from ernie_paddle.export.pipeline import export
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
from ernie_paddle.ort.runtime import OnnxCausalLM


@st.composite
def geometries(draw):
    nkv = draw(st.sampled_from([1, 2]))
    experts = draw(st.sampled_from([2, 4, 8]))
    layers = draw(st.integers(2, 3))
    return dict(
        model_type="ernie4_5_moe", vocab_size=draw(st.sampled_from([128, 300])),
        hidden_size=draw(st.sampled_from([32, 48, 64])), intermediate_size=draw(st.sampled_from([32, 96])),
        num_hidden_layers=layers, num_key_value_heads=nkv, num_attention_heads=nkv * draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([16, 32])), max_position_embeddings=512, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=draw(st.booleans()), moe_num_experts=experts,
        moe_k=draw(st.integers(1, experts)), moe_intermediate_size=draw(st.sampled_from([16, 32])),
        moe_num_shared_experts=draw(st.integers(0, 2)), moe_layer_start_index=draw(st.integers(0, 1)),
        moe_layer_end_index=-1, moe_layer_interval=draw(st.integers(1, 2)), moe_use_aux_free=draw(st.booleans()))


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries(), seed=st.integers(0, 1000))
def test_paddle_and_onnx_runtime_agree(tmp_path_factory, geometry, seed):
    cfg = ErnieConfig.from_dict(geometry, strict=True)
    work = tmp_path_factory.mktemp("prop")
    make_checkpoint(cfg, str(work / "ckpt"), layout="pt", dtype="float32", seed=seed)
    export(str(work / "ckpt"), str(work / "onnx"), verify=False)
    paddle_model = Ernie4_5_MoeForCausalLM.from_pretrained(str(work / "ckpt"))
    onnx_model = OnnxCausalLM(str(work / "onnx"))
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, 12)
    assert np.abs(paddle_model.logits(ids) - onnx_model.logits(ids)).max() <= 1e-4
    gen = GenerationConfig(max_new_tokens=8, eos_token_ids=[])
    assert generate(paddle_model, ids.tolist(), gen) == generate(onnx_model, ids.tolist(), gen)

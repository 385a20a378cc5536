"""The Paddle model against transformers (eager, fp32) on random checkpoints of several geometries.

Bounds: max |logit diff| <= 1e-4; identical top-k expert sets for every token and MoE layer; 32 identical
greedy tokens. Paddle-layout checkpoints are converted to -PT by our converter for transformers to read.
"""

from __future__ import annotations

import numpy as np
import pytest

from ernie_paddle.checkpoint.folder import convert
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

from conftest import import_hf_oracle, prompt

hf_oracle = import_hf_oracle()

GEOMETRIES = {
    # name: (layout, dtype on disk, shard bytes, config overrides)
    "gqa1-tied-k2-paddle": ("paddle", "float32", 1 << 40, dict(num_key_value_heads=4, moe_k=2)),
    "gqa2-headdim24-k1-untied-pt": ("pt", "float32", 1 << 40,
                                    dict(head_dim=24, moe_k=1, tie_word_embeddings=False)),
    "gqa5-k6-untied-bf16-sharded-paddle": ("paddle", "bfloat16", 200_000,
                                           dict(hidden_size=80, num_attention_heads=10, num_key_value_heads=2,
                                                moe_k=6, tie_word_embeddings=False)),
    "interval2-dense-tail-noshared-pt": ("pt", "bfloat16", 150_000,
                                         dict(num_hidden_layers=5, moe_layer_start_index=1, moe_layer_end_index=3,
                                              moe_layer_interval=2, moe_num_shared_experts=0,
                                              tie_word_embeddings=False)),
    "dense-ernie4_5-headdim32-pt": ("pt", "float32", 1 << 40,
                                    dict(model_type="ernie4_5", num_key_value_heads=1, head_dim=32)),
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def pair(request, ckpt_factory, tmp_path_factory):
    layout, dtype, shard, overrides = GEOMETRIES[request.param]
    d, cfg = ckpt_factory(request.param, layout=layout, dtype=dtype, max_shard_bytes=shard, seed=7, **overrides)
    pt_dir = d
    if layout == "paddle":
        pt_dir = str(tmp_path_factory.mktemp("hf") / request.param)
        convert(d, pt_dir, layout="pt", dtype="float32")
    return Ernie4_5_MoeForCausalLM.from_pretrained(d), hf_oracle.HFOracle(pt_dir), cfg


def test_logits_and_router_match_transformers(pair):
    model, hf, cfg = pair
    ids = prompt(24, cfg.vocab_size, seed=1)
    out = model(np.array([ids]), output_router=True)
    ours = out.logits.numpy()[0]
    ref, ref_router = hf.forward(ids)
    assert ours.shape == ref.shape == (24, cfg.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-4
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert len(out.router_experts) == len(ref_router) == len(moe_layers)
    for layer, a, b in zip(moe_layers, out.router_experts, ref_router):
        assert a.shape == list(b.shape) == [24, cfg.moe_k]
        mismatched = [t for t in range(24) if set(a.numpy()[t]) != set(b[t])]
        assert not mismatched, f"layer {layer}: expert sets differ at tokens {mismatched}"


def test_32_greedy_tokens_match_transformers(pair):
    model, hf, cfg = pair
    ids = prompt(6, cfg.vocab_size, seed=2)
    ours = generate(model, ids, GenerationConfig(max_new_tokens=32, eos_token_ids=[]))
    assert len(ours) == 32
    assert ours == hf.greedy(ids, 32)

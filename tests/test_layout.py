"""The layout table's roles: every canonical tensor has one, with the facts its consumers read."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from conftest import tiny_config
from ernie_paddle.checkpoint.layout import LAYOUTS, PT, Role, canonical_maps, maps_by_role, tensor_maps


def test_every_tensor_has_its_role_layer_and_expert():
    cfg = tiny_config(tie_word_embeddings=False)  # 3 layers, layer 0 dense, 8 experts, shared experts, aux-free
    maps = tensor_maps(cfg, PT)
    roles = Counter(m.role for m in maps)
    n = cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(n))
    e = cfg.moe_num_experts
    assert moe_layers == n - 1
    assert roles == {Role.EMBEDDING: 1, Role.FINAL_NORM: 1, Role.LM_HEAD: 1,
                     Role.INPUT_NORM: n, Role.QKV: n, Role.ATTN_OUT: n, Role.POST_ATTN_NORM: n,
                     Role.MLP_UP_GATE: n - moe_layers, Role.MLP_DOWN: n - moe_layers,
                     Role.ROUTER: moe_layers, Role.ROUTER_BIAS: moe_layers,
                     Role.EXPERT_UP_GATE: e * moe_layers, Role.EXPERT_DOWN: e * moe_layers,
                     Role.SHARED_UP_GATE: moe_layers, Role.SHARED_DOWN: moe_layers}
    assert [m.canonical for m in maps if m.layer is None] == ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    for m in maps:
        assert (m.layer is None) or m.canonical.startswith(f"layers.{m.layer}.")
        assert (m.expert is not None) == m.role.routed_expert
        if m.expert is not None:
            assert f".experts.{m.expert}." in m.canonical
    # the checkpoint order groups each layer's tensors together, so a stream can be cut by layer
    layers = [k for k, _ in itertools.groupby(maps, key=lambda m: m.layer)]
    assert layers == [None, *range(cfg.num_hidden_layers), None]
    # roles do not depend on the on-disk layout
    assert all([m.role for m in tensor_maps(cfg, lay)] == [m.role for m in maps] for lay in LAYOUTS)


def test_maps_by_role_find_each_tensor_once():
    cfg = tiny_config(tie_word_embeddings=False)
    by_role = maps_by_role(cfg)
    assert sorted(m.canonical for m in by_role.values()) == sorted(m.canonical for m in tensor_maps(cfg, PT))
    assert by_role[(Role.ATTN_OUT, 2, None)].canonical == "layers.2.self_attn.o_proj.weight"
    assert by_role[(Role.EXPERT_DOWN, 1, 3)].canonical == "layers.1.mlp.experts.3.down_proj.weight"
    assert by_role[(Role.LM_HEAD, None, None)].canonical == "lm_head.weight"


def test_role_facts():
    maps = canonical_maps(tiny_config())
    fp32 = {m.canonical for m in maps.values() if m.keep_fp32}
    assert fp32 == {n for n in maps if n.endswith(("mlp.gate.weight", "mlp.e_score_correction_bias"))}
    quantised = {m.role for m in maps.values() if m.role.quantised}
    assert quantised == {Role.QKV, Role.ATTN_OUT, Role.MLP_UP_GATE, Role.MLP_DOWN, Role.EXPERT_UP_GATE,
                         Role.EXPERT_DOWN, Role.SHARED_UP_GATE, Role.SHARED_DOWN}  # every Linear but the router
    assert Role.LM_HEAD.quantised and not Role.EMBEDDING.quantised
    assert {r for r in Role if r.tp_axis == 0} == {r for r in Role if r.residual_output}
    assert Role.QKV.tp_axis == 1 and Role.EMBEDDING.tp_axis is None and Role.ROUTER.tp_axis is None
    assert all(r.is_norm == r.name.endswith("NORM") for r in Role)


def test_out_blocks_cut_qkv_and_up_gate():
    cfg = tiny_config()
    maps = canonical_maps(cfg)
    qkv = maps["layers.0.self_attn.qkv_proj.weight"]
    d = cfg.head_dim
    assert qkv.blocks == (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)
    a = np.arange(np.prod(qkv.shape), dtype=np.float32).reshape(qkv.shape)
    q, k, v = qkv.out_blocks(a)
    assert np.array_equal(np.concatenate([q, k, v], axis=1), a) and k.shape == v.shape
    up_gate = maps["layers.1.mlp.experts.0.up_gate_proj.weight"]
    assert up_gate.blocks == (cfg.moe_intermediate_size,) * 2
    assert maps["layers.1.mlp.experts.0.down_proj.weight"].out_blocks(a)[0] is a  # one block

"""benchmarking/weight_bytes: the bytes a decoded token reads, counted from an export's graph and from a GGUF file,
against the layouts' sizes worked out from the config (what MatMulNBits, QMoE and Q4_0 store per weight)."""

from __future__ import annotations

import pytest

from ernie_paddle.benchmarking.weight_bytes import gguf_token_bytes, onnx_token_bytes
from ernie_paddle.errors import InputError
from ernie_paddle.memory import packed_bytes


def _moe_layers(cfg) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


@pytest.fixture(scope="module")
def int4_export(tiny_ckpt, tmp_path_factory):
    from ernie_paddle.export.pipeline import export

    d, cfg = tiny_ckpt
    out = str(tmp_path_factory.mktemp("wb") / "int4")
    export(d, out, precision="int4", block_size=32, accuracy_level=4, verify=False)
    return out, cfg


def test_onnx_counts_experts_k_of_e_and_one_row_of_each_looked_up_table(int4_export):
    folder, cfg = int4_export
    h, i, e, k, v = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts, cfg.moe_k, cfg.vocab_size
    tb = onnx_token_bytes(folder)
    # QMoE int4 block 32: half a byte a weight and an fp16 scale per 32, fc1 [2I, H] and fc2 [H, I] per expert
    experts = _moe_layers(cfg) * e * 3 * i * h * (1 / 2 + 2 / 32)
    assert tb.experts_per_token == round(experts * k / e)
    embedding = v * h * 4  # fp32, gathered by token id
    rope = 2 * cfg.max_position_embeddings * cfg.head_dim // 2 * 4  # cos and sin caches, looked up by position
    assert tb.per_token == round(tb.stored - experts * (1 - k / e) - embedding * (1 - 1 / v)
                                 - rope * (1 - 1 / cfg.max_position_embeddings))


def test_packed_bytes_replace_the_stored_layout_at_accuracy_level_4_only(int4_export, tiny_ckpt, tmp_path):
    from ernie_paddle.export.pipeline import export

    folder, cfg = int4_export
    h, v = cfg.hidden_size, cfg.vocab_size
    tb = onnx_token_bytes(folder)
    # the untied LM head alone: stored as codes + fp32 scales, read as MLAS's packed blocks
    head_stored, head_packed = v * h // 2 + v * h // 32 * 4, packed_bytes(v * h, 4, 32)
    assert tb.packed_per_token > tb.per_token
    assert tb.packed_per_token - tb.per_token > head_packed - head_stored
    acc0 = str(tmp_path / "acc0")
    export(tiny_ckpt[0], acc0, precision="int4", block_size=32, accuracy_level=0, verify=False)
    tb0 = onnx_token_bytes(acc0)
    assert (tb0.per_token, tb0.packed_per_token) == (tb.per_token, tb.per_token)


def test_gguf_q4_0_counts_experts_k_of_e_and_one_embedding_row(tiny_ckpt, tmp_path):
    from ernie_paddle.export.gguf import write_gguf

    d, cfg = tiny_ckpt
    path = str(tmp_path / "tiny-q4_0.gguf")
    write_gguf(d, path, "Q4_0")
    h, i, e, k, v = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts, cfg.moe_k, cfg.vocab_size
    tb = gguf_token_bytes(path, k)
    experts = _moe_layers(cfg) * e * 3 * i * h * 18 / 32  # Q4_0: 18 bytes per 32 weights
    embedding = v * h * 18 / 32  # the untied checkpoint has its own output.weight
    assert tb.experts_per_token == round(experts * k / e)
    assert tb.per_token == round(tb.stored - experts * (1 - k / e) - embedding * (1 - 1 / v))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}/model.onnx: no such file"):
        onnx_token_bytes(str(tmp_path))
    with pytest.raises(InputError, match=f"{tmp_path}/x.gguf: no such file"):
        gguf_token_bytes(str(tmp_path / "x.gguf"), 6)

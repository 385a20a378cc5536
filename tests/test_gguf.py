"""The GGUF writer, checked by the `gguf` package's own reader against llama.cpp's tensor-name table.

Names and values are checked against a -PT conversion of the checkpoint mapped through `gguf`'s TensorNameMap
(llama.cpp's own table of transformers names), not against the writer's table: an independent oracle.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from ernie_paddle.checkpoint.folder import convert
from ernie_paddle.errors import ExportError
from ernie_paddle.export.gguf import write_gguf

from conftest import prompt, run_cli

ARCH = gguf.MODEL_ARCH.ERNIE4_5_MOE


def _pt_tensors_by_gguf_name(pt_dir: str, n_layers: int) -> dict[str, np.ndarray]:
    """The -PT checkpoint's tensors under llama.cpp's GGUF names (routed experts stacked, as llama.cpp's
    converter does)."""
    names = gguf.get_tensor_name_map(ARCH, n_layers)
    raw: dict[str, np.ndarray] = {}
    for f in sorted(os.listdir(pt_dir)):
        if f.endswith(".safetensors"):
            raw.update(load_file(os.path.join(pt_dir, f)))
    experts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, arr in raw.items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(.*)", name)
        if m:  # one tensor per expert on disk, one [E, ...] tensor in GGUF
            experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = arr
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = arr
    for name, per_expert in experts.items():
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = np.stack(
            [per_expert[j] for j in range(len(per_expert))])
    out = {k: v.reshape(-1) if k.endswith("exp_probs_b.bias") else v for k, v in out.items()}  # [1, E] on disk
    assert None not in out, "a -PT tensor has no llama.cpp name"
    return out


@pytest.fixture(scope="module")
def pt_reference(tiny_ckpt, tmp_path_factory):
    d, cfg = tiny_ckpt
    pt = str(tmp_path_factory.mktemp("gguf") / "pt")
    convert(d, pt, layout="pt", dtype="float32")
    return _pt_tensors_by_gguf_name(pt, cfg.num_hidden_layers)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_f32_gguf_holds_every_tensor_exactly_and_the_hyperparameters(tiny_ckpt, pt_reference, tmp_path):
    d, cfg = tiny_ckpt
    path = str(tmp_path / "tiny-f32.gguf")
    write_gguf(d, path, "F32")
    assert os.listdir(tmp_path) == ["tiny-f32.gguf"]
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "ernie4_5-moe"
    assert _field(reader, "general.file_type") == 0  # all F32
    a = "ernie4_5-moe"
    expected = {f"{a}.block_count": cfg.num_hidden_layers, f"{a}.embedding_length": cfg.hidden_size,
                f"{a}.attention.head_count": cfg.num_attention_heads,
                f"{a}.attention.head_count_kv": cfg.num_key_value_heads, f"{a}.expert_count": cfg.moe_num_experts,
                f"{a}.expert_used_count": cfg.moe_k, f"{a}.expert_shared_count": cfg.moe_num_shared_experts,
                f"{a}.expert_feed_forward_length": cfg.moe_intermediate_size,
                f"{a}.leading_dense_block_count": cfg.moe_layer_start_index, f"{a}.vocab_size": cfg.vocab_size,
                f"{a}.context_length": cfg.max_position_embeddings}
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, f"{a}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert len(_field(reader, "tokenizer.ggml.tokens")) == cfg.vocab_size
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(pt_reference)
    for name, ref in pt_reference.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert tuple(int(x) for x in t.shape) == ref.shape[::-1], name  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(t.data), ref, err_msg=name)


def test_q4_0_gguf_quantises_the_matrices_only_within_the_format_bound(tiny_ckpt, pt_reference, tmp_path):
    d, _ = tiny_ckpt
    path = str(tmp_path / "tiny-q4_0.gguf")
    write_gguf(d, path, "Q4_0")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.file_type") == 2
    for t in reader.tensors:
        ref = pt_reference[t.name]
        if ref.ndim == 1 or ".ffn_gate_inp." in t.name:  # norms, the router and its bias stay F32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_array_equal(np.asarray(t.data), ref, err_msg=t.name)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, t.name
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
        # Q4_0: blocks of 32 with scale d = absmax / 8; a value is off by at most d (the code clipped at +7)
        blocks = ref.reshape(-1, 32)
        bound = np.abs(blocks).max(-1, keepdims=True) / 8 * 1.001  # + the fp16 rounding of d
        assert (np.abs(deq.reshape(-1, 32) - blocks) <= bound).all(), t.name


def test_refusals_leave_no_file(tiny_ckpt, ckpt_factory, tmp_path):
    d, _ = tiny_ckpt
    with pytest.raises(ExportError, match="GGUF type must be one of F32, F16, Q8_0, Q4_0, got 'Q3_K'"):
        write_gguf(d, str(tmp_path / "x.gguf"), "Q3_K")
    dense, _ = ckpt_factory("gguf-dense", model_type="ernie4_5")
    with pytest.raises(ExportError, match="MoE architecture"):
        write_gguf(dense, str(tmp_path / "x.gguf"), "F32")
    assert os.listdir(tmp_path) == []


def test_an_error_while_writing_leaves_no_temporary_file(tiny_ckpt, tmp_path, monkeypatch):
    from ernie_paddle.export import gguf as writer

    d, _ = tiny_ckpt

    def broken(*_args):  # reading the first tensor fails, after the header is written
        raise OSError("read error")
        yield  # a generator, as `_arrays`

    monkeypatch.setattr(writer, "_arrays", broken)
    with pytest.raises(OSError, match="read error"):
        write_gguf(d, str(tmp_path / "x.gguf"), "F32")
    assert os.listdir(tmp_path) == []


# ---- llama.cpp itself (when llama-cpp-python is installed) --------------------------------------------------------
def _need_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed (docs/performance.md builds it); the file itself "
                    "is checked by gguf's reader in the tests above")


def test_llama_cpp_as_a_parity_candidate_matches_paddle(tiny_ckpt, tmp_path):
    """An F32 file with llama.cpp's KV cache in F32: fp32 throughout, so logits agree as two fp32 implementations
    do (the bound of the other fp32 candidates; measured 1.9e-5 on the shipped model) and greedy tokens are equal."""
    _need_llama_cpp()
    d, cfg = tiny_ckpt
    path = str(tmp_path / "tiny-f32.gguf")
    write_gguf(d, path, "F32")
    prompts, out = tmp_path / "prompts.txt", tmp_path / "parity.json"
    prompts.write_text("5,6,7,8,9,10,11\n100,200,300\n")
    r = run_cli("parity", "--model", d, "--gguf", path, "--prompts", str(prompts), "--greedy-tokens", "12",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    (row,) = json.load(open(out))["candidates"]
    assert row["name"] == "llama.cpp:tiny-f32.gguf (F32)"
    assert row["logits_max_abs_diff"] <= 1e-4 and row["kl_divergence"] <= 1e-6 and row["top1_agreement"] == 1.0
    assert row["greedy_identical_tokens"] == [12, 12]
    # llama.cpp exposes neither hidden states nor router choices: reported as such, not as agreement
    assert row["hidden_max_abs_diff"] == [None] * (cfg.num_hidden_layers + 1)
    assert row["router_agreement"] == [None, None]


def test_parity_refuses_a_gguf_of_another_model(tiny_ckpt, ckpt_factory, tmp_path):
    _need_llama_cpp()
    d, _ = tiny_ckpt
    other, _ = ckpt_factory("gguf-two-layers", num_hidden_layers=2)
    path = str(tmp_path / "other.gguf")
    write_gguf(other, path, "F32")
    r = run_cli("parity", "--model", d, "--gguf", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{path}: not a GGUF of this model: layers 2 (the model has 3)" in r.stderr


def test_bench_llama_engine_decodes_the_models_tokens(tiny_ckpt, tmp_path):
    """The benchmark's llama.cpp runner reads real logits (not the zeros of an empty `scores` buffer): its greedy
    tokens are Paddle's."""
    _need_llama_cpp()
    from ernie_paddle.generation import GenerationConfig, generate
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
    from ernie_paddle.tools.bench import _Llama

    d, cfg = tiny_ckpt
    path = str(tmp_path / "tiny-f32.gguf")
    write_gguf(d, path, "F32")
    ids = prompt(8, cfg.vocab_size, seed=3)
    runner = _Llama(path, threads=2, n_ctx=32)
    logits, _ = runner.prefill(np.array([ids]))
    tokens = []
    for _ in range(10):
        tokens.append(int(logits[0].argmax()))
        logits, _ = runner.step(np.array(tokens[-1:]), None)
    model = Ernie4_5_MoeForCausalLM.from_pretrained(d)
    assert tokens == generate(model, ids, GenerationConfig(max_new_tokens=10, eos_token_ids=[]))

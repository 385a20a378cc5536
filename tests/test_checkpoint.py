"""Checkpoint layouts, conversion both ways, dtypes, sharding, and errors that name the file and tensor."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from ernie_paddle.checkpoint.folder import convert, make_checkpoint, random_tensors, write_checkpoint
from ernie_paddle.errors import CheckpointError
from ernie_paddle.checkpoint.layout import PT_FUSED
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
from ernie_paddle.paddle.weights import save_pretrained
from ernie_paddle.checkpoint.safetensors_io import (CheckpointReader, SafetensorsFile, ShardedWriter, bf16_to_f32,
                                                   f32_to_bf16)

from conftest import prompt, run_cli


def disk_tensors(d: str) -> dict[str, np.ndarray]:
    r = CheckpointReader(d)
    return {n: r.get(n) for n in r.names()}


def write_safetensors(path: str, items) -> None:
    """(name, array) pairs as one F32 safetensors file at `path`, written by the checkpoint writer."""
    staging = path + ".staging"
    os.mkdir(staging)
    writer = ShardedWriter(staging, max_shard_bytes=1 << 62)
    for name, a in items:
        writer.add(name, a, "F32")
    (single,) = writer.finish()
    os.replace(os.path.join(staging, single), path)
    os.rmdir(staging)


def copy_ckpt(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_bf16_rounding_is_nearest_even_and_exact_on_widening():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.5, 1e-3, np.inf], dtype=np.float32)
    y = bf16_to_f32(f32_to_bf16(x))
    assert y.tolist() == [1.0, 1.0, 1.015625, -3.5, np.float32(0.00099945068359375), np.inf]
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_paddle_and_pt_layouts_convert_both_ways_exactly(tiny_ckpt, tmp_path):
    src, cfg = tiny_ckpt
    convert(src, str(tmp_path / "pt"), layout="pt", dtype="float32")
    convert(str(tmp_path / "pt"), str(tmp_path / "back"), layout="paddle", dtype="float32")
    a, b = disk_tensors(src), disk_tensors(str(tmp_path / "back"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    pt = disk_tensors(str(tmp_path / "pt"))
    # the -PT names and torch [out, in] shapes of the released ERNIE-4.5-21B-A3B-PT checkpoint
    h, e, ie = cfg.hidden_size, cfg.moe_num_experts, cfg.moe_intermediate_size
    assert pt["model.layers.1.mlp.gate.weight"].shape == (e, h)
    assert pt["model.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (1, e)
    assert pt["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (ie, h)
    assert pt["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.num_key_value_heads * cfg.head_dim, h)
    assert pt["lm_head.weight"].shape == (cfg.vocab_size, h)
    # and the -Paddle ones (§3.2): [in, out], fused [Q|K|V] and [gate|up], untied head [H, vocab]
    qkv = a["ernie.layers.0.self_attn.qkv_proj.weight"]
    q_w = cfg.num_attention_heads * cfg.head_dim
    assert np.array_equal(qkv[:, :q_w], pt["model.layers.0.self_attn.q_proj.weight"].T)
    ug = a["ernie.layers.1.mlp.experts.3.up_gate_proj.weight"]
    assert np.array_equal(ug[:, :ie], pt["model.layers.1.mlp.experts.3.gate_proj.weight"].T)
    assert np.array_equal(ug[:, ie:], pt["model.layers.1.mlp.experts.3.up_proj.weight"].T)
    assert a["lm_head.weight"].shape == (h, cfg.vocab_size)


def test_fused_name_pt_variant_and_mtp_tensors_load(tiny_ckpt, tmp_path):
    src, cfg = tiny_ckpt
    fused = str(tmp_path / "fused")
    write_checkpoint(cfg, random_tensors(cfg, seed=11), fused, layout=PT_FUSED, dtype="float32")
    names = CheckpointReader(fused).names()
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.up_gate_proj.weight" in names
    # add multi-token-prediction tensors, which inference ignores
    write_safetensors(os.path.join(fused, "model.safetensors"),
                      list(disk_tensors(fused).items())
                      + [("model.mtp_block.0.self_attn.q_proj.weight", np.ones((4, 4), np.float32)),
                         ("model.mtp_linear_proj.0.weight", np.ones((4, 8), np.float32))])
    ids = prompt(10, cfg.vocab_size)
    ref = Ernie4_5_MoeForCausalLM.from_pretrained(src).logits(ids)
    assert np.array_equal(Ernie4_5_MoeForCausalLM.from_pretrained(fused).logits(ids), ref)


def test_bf16_sharded_checkpoint_keeps_router_fp32(ckpt_factory):
    d, cfg = ckpt_factory("bf16-sharded", dtype="bfloat16", max_shard_bytes=60_000, seed=3)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    r = CheckpointReader(d)
    assert r.info("ernie.layers.1.mlp.gate.weight").dtype == "F32"
    assert r.info("ernie.layers.1.mlp.moe_statics.e_score_correction_bias").dtype == "F32"
    assert r.info("ernie.layers.1.self_attn.qkv_proj.weight").dtype == "BF16"
    m = Ernie4_5_MoeForCausalLM.from_pretrained(d)
    assert str(m.layers[1].mlp.gate.weight.dtype) == "paddle.float32"


def test_save_pretrained_round_trip_both_layouts(tiny_ckpt, tmp_path):
    src, cfg = tiny_ckpt
    m = Ernie4_5_MoeForCausalLM.from_pretrained(src)
    ids = prompt(12, cfg.vocab_size, seed=5)
    ref = m.logits(ids)
    for layout in ("pt", "paddle"):
        out = str(tmp_path / layout)
        files = save_pretrained(m, out, layout=layout, max_shard_bytes=100_000)
        assert "model.safetensors.index.json" in files
        assert np.array_equal(Ernie4_5_MoeForCausalLM.from_pretrained(out).logits(ids), ref)


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.fixture()
def sharded(ckpt_factory, tmp_path):
    d, cfg = ckpt_factory("err-sharded", dtype="float32", max_shard_bytes=150_000, seed=4)
    return copy_ckpt(d, tmp_path / "ck"), cfg


def test_missing_shard_is_named(sharded):
    d, _ = sharded
    os.remove(os.path.join(d, "model-00002-of-00007.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00007.safetensors: shard listed in "
                                              r"model.safetensors.index.json is missing"):
        Ernie4_5_MoeForCausalLM.from_pretrained(d)


def test_truncated_file_is_named(sharded):
    d, _ = sharded
    p = os.path.join(d, "model-00003-of-00007.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00007.safetensors: file is truncated: tensor '.*' "
                                              r"ends at byte \d+ but the file has \d+ bytes"):
        Ernie4_5_MoeForCausalLM.from_pretrained(d)


def rewrite(d: str, fn) -> None:
    """Rewrite the single-file checkpoint in d with fn(list of (name, array)) -> list."""
    p = os.path.join(d, "model.safetensors")
    write_safetensors(p, fn(list(disk_tensors(d).items())))


@pytest.fixture()
def single(tiny_ckpt, tmp_path):
    return copy_ckpt(tiny_ckpt[0], tmp_path / "ck")


def test_wrong_shape_is_named(single):
    name = "ernie.layers.1.mlp.experts.2.down_proj.weight"
    rewrite(single, lambda items: [(n, a[:-1] if n == name else a) for n, a in items])
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*model.safetensors has shape \[31, 64\], "
                                              rf"expected \[32, 64\]"):
        Ernie4_5_MoeForCausalLM.from_pretrained(single)


def test_missing_and_unexpected_tensors_are_named(single):
    rewrite(single, lambda items: [(n.replace("ernie.norm.weight", "ernie.final_norm.weight"), a)
                                   for n, a in items])
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): ernie.norm.weight; unexpected 1 "
                                              r"tensor\(s\): ernie.final_norm.weight"):
        Ernie4_5_MoeForCausalLM.from_pretrained(single)


def test_a_layer_filled_on_its_own_gets_every_parameter_and_only_its_own(tiny_ckpt):
    """The parity report's streamed reference fills one decoder layer at a time (`fill_parameters(part=...)`)."""
    from ernie_paddle.checkpoint.folder import read_canonical
    from ernie_paddle.paddle.weights import fill_parameters

    d, cfg = tiny_ckpt
    model = Ernie4_5_MoeForCausalLM(cfg, with_layers=False)
    model.layers[1] = model.decoder_layer(1)
    layer_1 = [(m, a) for m, a in read_canonical(d, cfg) if m.layer == 1]
    with pytest.raises(CheckpointError, match=r"no checkpoint tensor for model parameter\(s\) "
                                              r"layers\.1\.input_layernorm\.weight$"):
        fill_parameters(model, layer_1[1:], d, "layer 1", part=model.layers[1])
    layer_2 = [(m, a) for m, a in read_canonical(d, cfg) if m.layer == 2]
    with pytest.raises(CheckpointError, match=r"the model has no parameter for 'layers\.2\.input_layernorm"):
        fill_parameters(model, layer_2, d, "layer 1", part=model.layers[1])
    fill_parameters(model, layer_1, d, "layer 1", part=model.layers[1])
    whole = Ernie4_5_MoeForCausalLM.from_pretrained(d)
    assert all(np.array_equal(p.numpy(), whole.layers[1].state_dict()[n].numpy())
               for n, p in model.layers[1].state_dict().items())


def test_nan_weights_are_reported(single):
    name = "ernie.layers.2.self_attn.o_proj.weight"

    def poison(items):
        out = []
        for n, a in items:
            if n == name:
                a = a.copy()
                a[0, 0] = np.nan
            out.append((n, a))
        return out

    rewrite(single, poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' contains NaN or Inf"):
        Ernie4_5_MoeForCausalLM.from_pretrained(single)


def test_bad_index_and_duplicates_and_empty_dir(sharded, tmp_path):
    d, _ = sharded
    idx = os.path.join(d, "model.safetensors.index.json")
    data = json.load(open(idx))
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "model-00007-of-00007.safetensors"
    json.dump(data, open(idx, "w"))
    with pytest.raises(CheckpointError, match=rf"places tensor '{name}' in this shard but the shard does not hold it"):
        CheckpointReader(d)
    open(idx, "w").write("[]")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        CheckpointReader(d)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json found"):
        CheckpointReader(str(tmp_path / "empty"))


def test_corrupt_header_is_named(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match=f"{p}: corrupt safetensors header"):
        SafetensorsFile(str(p))


def test_make_checkpoint_is_atomic_on_failure(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config()

    def broken():
        for i, item in enumerate(random_tensors(cfg)):
            if i == 5:
                raise RuntimeError("interrupted")
            yield item

    with pytest.raises(RuntimeError, match="interrupted"):
        write_checkpoint(cfg, broken(), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    make_checkpoint(cfg, str(tmp_path / "ok"), layout="pt")
    assert sorted(os.listdir(tmp_path / "ok")) == ["config.json", "model.safetensors"]


def test_output_under_a_file_is_refused_with_one_line(tiny_ckpt, tmp_path):
    # a file stands where a parent folder of --out should be: status 2 and one line, as export says it
    (tmp_path / "afile").write_text("keep")
    out = str(tmp_path / "afile" / "sub" / "out")
    line = f"error: {out}: cannot create the output directory: {tmp_path / 'afile'} is a file, not a directory"
    for command in (("convert", "--model", tiny_ckpt[0]), ("make-checkpoint", "--preset", "tiny")):
        r = run_cli(*command, "--layout", "pt", "--out", out)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], r.stderr
    with pytest.raises(CheckpointError, match=f"^{line[len('error: '):]}$"):
        make_checkpoint(tiny_ckpt[1], out)
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "keep"


def test_side_files_travel_with_convert_and_export(tiny_ckpt, tmp_path):
    from ernie_paddle.export.pipeline import copy_checkpoint_files

    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt[0], src)
    side = {"tokenizer_config.json": '{"legacy": true}', "generation_config.json": '{"top_p": 0.8}'}
    for name, text in side.items():
        (src / name).write_text(text)
    convert(str(src), str(tmp_path / "converted"), layout="pt", dtype="float32")
    (tmp_path / "exported").mkdir()
    copy_checkpoint_files(str(src), tiny_ckpt[1], str(tmp_path / "exported"))
    assert sorted(os.listdir(tmp_path / "exported")) == ["config.json", *sorted(side)]
    for folder in ("converted", "exported"):
        assert {n: (tmp_path / folder / n).read_text() for n in side} == side
        assert not (tmp_path / folder / "tokenizer.model").exists()  # only the files the source has


def test_default_shard_size_is_5gb_as_hugging_face_means_it():
    from ernie_paddle.checkpoint.safetensors_io import MAX_SHARD_BYTES
    from ernie_paddle.sizes import parse_size

    assert MAX_SHARD_BYTES == parse_size("5GB") == 5 * 10**9


def test_pickled_pdparams_are_refused_unless_allowed(tiny_ckpt, tmp_path):
    import paddle

    src, cfg = tiny_ckpt
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(src, "config.json"), d / "config.json")
    paddle.save({n: paddle.to_tensor(a) for n, a in disk_tensors(src).items()}, str(d / "model_state.pdparams"))
    with pytest.raises(CheckpointError, match=r"model_state.pdparams: pickled Paddle weights are not loaded by "
                                              r"default .* pass --allow-pickle"):
        Ernie4_5_MoeForCausalLM.from_pretrained(str(d))
    ids = prompt(8, cfg.vocab_size)
    got = Ernie4_5_MoeForCausalLM.from_pretrained(str(d), allow_pickle=True).logits(ids)
    assert np.array_equal(got, Ernie4_5_MoeForCausalLM.from_pretrained(src).logits(ids))
    convert(str(d), str(tmp_path / "st"), layout="paddle", dtype="float32", allow_pickle=True)
    assert disk_tensors(str(tmp_path / "st")).keys() == disk_tensors(src).keys()


def test_wrong_dtype_is_named(single):
    name = "ernie.layers.0.input_layernorm.weight"
    p = os.path.join(single, "model.safetensors")
    items = list(disk_tensors(single).items())
    from ernie_paddle.checkpoint.safetensors_io import _encode, _write_encoded

    enc = [(n, list(a.shape), *_encode(a, "F32")) for n, a in items if n != name]
    enc.append((name, [64], "I32", np.zeros(64, np.int32).tobytes()))
    _write_encoded(p, enc, None)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .* has dtype I32, expected a floating-point"):
        Ernie4_5_MoeForCausalLM.from_pretrained(single)


def test_duplicate_tensor_is_named(sharded):
    d, _ = sharded
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    first = sorted(set(idx["weight_map"].values()))[0]
    dup = next(n for n, f in idx["weight_map"].items() if f != first)
    shard = os.path.join(d, first)
    write_safetensors(shard, [(k, CheckpointReader(d).get(k)) for k, f in idx["weight_map"].items() if f == first]
                      + [(dup, CheckpointReader(d).get(dup))])
    with pytest.raises(CheckpointError, match=rf"{first}: tensor '{dup}' is not listed in|duplicate tensor '{dup}'"):
        CheckpointReader(d)


def test_checkpoint_io_is_numpy_only(tiny_ckpt):
    """The exporter and the ONNX side read and write checkpoints without importing Paddle; the moved Paddle
    helpers stay importable from `checkpoint` (the README's `save_pretrained`)."""
    import subprocess
    import sys

    code = ("import sys; from ernie_paddle.checkpoint.folder import read_canonical; "
            f"n = sum(1 for _ in read_canonical({tiny_ckpt[0]!r})); "
            "print(n, sorted(m for m in sys.modules if m == 'paddle' or m.startswith('paddle.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(sum(1 for _ in random_tensors(tiny_ckpt[1]))) and out[1:] == ["[]"]

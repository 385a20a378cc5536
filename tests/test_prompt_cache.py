"""`generate --prompt-cache FILE` (ernie_paddle.prompt_cache): the first run saves the prompt's KV, a later run whose
prompt shares a prefix with it prefills only the rest and gives the tokens a run without the file gives, on ONNX
Runtime and on Paddle; a file of another model, engine or cache dtype, or a damaged one, is refused by name; a failed
write leaves the old file whole."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest

from ernie_paddle import kv_file
from ernie_paddle.checkpoint.fingerprint import fingerprint
from ernie_paddle.checkpoint.safetensors_io import SafetensorsFile
from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate, prefill, right_padded
from ernie_paddle.prompt_cache import PromptCache

from conftest import prompt, run_cli, run_cli_onnx

NEW = 8  # new tokens per run
TOL = 1e-4  # logits with a reused prefix against without: a prefix changes only where the passes start, as chunks do
NO_TIE = 21  # a prompt seed whose greedy answer has no near tie (seed 3's 7th token: two logits 2e-7 apart)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def cli(kind: str, models, *args: str):
    """`ernie-onnx generate` on the tiny export or `ernie-paddle generate` on the tiny checkpoint."""
    if kind == "onnx":
        return run_cli_onnx("generate", "--model", models["onnx"].folder, *args)
    return run_cli("generate", "--model", models["paddle"].source, *args)


def ids_arg(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def run_json(kind: str, models, ids: list[int], *args: str) -> dict:
    r = cli(kind, models, "--input-ids", ids_arg(ids), "--max-new-tokens", str(NEW), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def refused(r) -> str:
    """The one error line of a refused run (status 2)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def gen() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW, eos_token_ids=[])


# ---- two runs of the command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_the_second_run_takes_the_prompt_from_the_file_and_answers_the_same(models, kind, tmp_path):
    ids = prompt(40, models[kind].config.vocab_size, seed=NO_TIE)
    path = str(tmp_path / "prompt.kv")
    plain = run_json(kind, models, ids)
    first = run_json(kind, models, ids, "--prompt-cache", path)
    assert (plain["cached_tokens"], first["cached_tokens"]) == (0, 0)
    tokens, layers, _ = kv_file.read(path, kv_file.PROMPT, models[kind].identity)
    assert tokens.tolist() == ids and layers[0][0].shape[1] == len(ids)
    stamp = os.stat(path).st_mtime_ns
    second = run_json(kind, models, ids, "--prompt-cache", path)
    assert second["cached_tokens"] == len(ids) - 1  # the last prompt token runs, for its logits
    assert first["token_ids"] == second["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) > 1
    assert os.stat(path).st_mtime_ns == stamp  # the file held exactly this prompt: not written again


def test_the_summary_line_counts_the_cached_tokens(models, tmp_path):
    ids = prompt(30, models["onnx"].config.vocab_size, seed=4)
    path = str(tmp_path / "prompt.kv")
    plain = run_json("onnx", models, ids)
    r = cli("onnx", models, "--input-ids", ids_arg(ids), "--max-new-tokens", str(NEW), "--prompt-cache", path)
    assert r.returncode == 0 and "from the prompt cache" not in r.stderr, r.stderr
    longer = ids + prompt(5, models["onnx"].config.vocab_size, seed=5)
    r = cli("onnx", models, "--input-ids", ids_arg(longer), "--max-new-tokens", str(NEW), "--prompt-cache", path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("[prompt 35 tokens (30 from the prompt cache), generated ")
    assert [int(t) for t in r.stdout.split()] == run_json("onnx", models, longer)["token_ids"]
    assert plain["cached_tokens"] == 0


def test_text_and_chat_prompts_reuse_the_file(tmp_path):
    """The shipped model's tokenizer: a --prompt-file that continues a --prompt, and a --chat asked twice."""
    path, text = str(tmp_path / "text.kv"), "ROMEO: But soft, what light through yonder window breaks?"
    doc = tmp_path / "doc.txt"
    doc.write_text(text + " It is the east, and Juliet is the sun.", encoding="utf-8")
    common = ("generate", "--max-new-tokens", "6", "--json")
    first = json.loads(run_cli(*common, "--prompt", text, "--prompt-cache", path).stdout)
    more = json.loads(run_cli(*common, "--prompt-file", str(doc), "--prompt-cache", path).stdout)
    plain = json.loads(run_cli(*common, "--prompt-file", str(doc)).stdout)
    assert first["cached_tokens"] == 0 and 0 < more["cached_tokens"] < more["prompt_tokens"]
    assert more["token_ids"] == plain["token_ids"]
    chat = ("--chat", "--prompt", "What news from Padua?", "--prompt-cache", str(tmp_path / "chat.kv"))
    a, b = (json.loads(run_cli(*common, *chat).stdout) for _ in range(2))
    assert (a["cached_tokens"], b["cached_tokens"]) == (0, b["prompt_tokens"] - 1)
    assert a["token_ids"] == b["token_ids"] and a["content"] == b["content"]


@pytest.fixture(scope="module")
def int8_dir(tiny_ckpt, tmp_path_factory) -> str:
    """The tiny checkpoint exported with the int8 KV cache."""
    from ernie_paddle.export import pipeline

    out = str(tmp_path_factory.mktemp("kv8") / "ort-kv8")
    pipeline.export(tiny_ckpt[0], out, flavor="ort", precision="fp32", kv_cache="int8", verify=False)
    return out


# ---- reuse through the API: longer, diverging, exact ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_a_longer_prompt_reuses_the_file_and_a_diverging_one_up_to_the_divergence(models, kind, tmp_path):
    model, vocab = models[kind], models[kind].config.vocab_size
    path = str(tmp_path / "p.kv")
    base = prompt(37, vocab, seed=6)
    hook = PromptCache(path)
    assert generate(model, base, gen(), hook) == generate(model, base, gen()) and hook.cached_tokens == 0
    longer = base + prompt(12, vocab, seed=7)
    hook = PromptCache(path)
    assert generate(model, longer, gen(), hook) == generate(model, longer, gen())
    assert hook.cached_tokens == 37
    assert kv_file.read(path, kv_file.PROMPT, model.identity)[0].tolist() == longer  # the file now holds it
    k = 20
    diverging = longer[:k] + [t % (vocab - 3) + 3 for t in np.array(longer[k:]) + 1]  # every token after k differs
    hook = PromptCache(path)
    assert generate(model, diverging, gen(), hook) == generate(model, diverging, gen())
    assert hook.cached_tokens == k
    shorter = diverging[:30]  # a prefix of the file's prompt: all but its last token come from the file
    hook = PromptCache(path)
    assert generate(model, shorter, gen(), hook) == generate(model, shorter, gen())
    assert hook.cached_tokens == 29


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_logits_after_a_loaded_prefix_match_a_full_prefill(models, kind, tmp_path):
    model, vocab = models[kind], models[kind].config.vocab_size
    ids = prompt(45, vocab, seed=8)
    path = str(tmp_path / "p.kv")
    generate(model, ids[:30], GenerationConfig(max_new_tokens=0), PromptCache(path))
    full = model.allocate_cache(1, 45)
    a, mask, pos = right_padded([np.array(ids)], model.config.pad_token_id, 45)
    want = prefill(model, a, mask, pos, full, chunk=512)
    cache = model.allocate_cache(1, 45)
    assert PromptCache(path).reuse(model, cache, [np.array(ids)]) == 30
    got = prefill(model, a, mask, pos, cache, chunk=512, start=30)
    assert cache.length == 45 and np.abs(got - want).max() <= TOL


def test_the_file_holds_the_prompt_as_prefill_left_it_whatever_was_decoded(models, tmp_path):
    """Saved after the sequence ends (so the write delays no token): decoding touched none of the prompt's slots."""
    model = models["onnx"]
    ids = prompt(25, model.config.vocab_size, seed=9)
    files = [str(tmp_path / f"{n}.kv") for n in (0, NEW)]
    for f, n in zip(files, (0, NEW)):
        generate(model, ids, GenerationConfig(max_new_tokens=n, eos_token_ids=[]), PromptCache(f))
    (t0, l0, _), (t1, l1, _) = (kv_file.read(f, kv_file.PROMPT, model.identity) for f in files)
    assert t0.tolist() == t1.tolist() == ids
    assert all(np.array_equal(x, y) for a, b in zip(l0, l1) for x, y in zip(a, b))


def test_the_int8_cache_is_reused_exactly(int8_dir, tmp_path):
    from ernie_paddle.ort.runtime import OnnxCausalLM

    model = OnnxCausalLM(int8_dir)
    ids = prompt(33, model.config.vocab_size, seed=10)
    path = str(tmp_path / "p.kv")
    generate(model, ids[:-5], gen(), PromptCache(path))
    hook = PromptCache(path)
    assert generate(model, ids, gen(), hook) == generate(model, ids, gen()) and hook.cached_tokens == 28
    assert kv_file.read(path, kv_file.PROMPT, model.identity)[1][0][0].dtype == np.int8


def test_one_prompt_only(models, tmp_path):
    with pytest.raises(InputError, match="^--prompt-cache holds one prompt; 2 were given$"):
        generate(models["onnx"], [[5, 6, 7], [8, 9, 10]], gen(), PromptCache(str(tmp_path / "p.kv")))


# ---- refused files -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paddle_file(models, tmp_path_factory) -> tuple[str, list[int]]:
    """A prompt-cache file the tiny Paddle model wrote, and its prompt."""
    ids = prompt(20, models["paddle"].config.vocab_size, seed=12)
    path = str(tmp_path_factory.mktemp("pc") / "paddle.kv")
    generate(models["paddle"], ids, GenerationConfig(max_new_tokens=0), PromptCache(path))
    return path, ids




def copy(path: str, tmp_path) -> str:
    """A copy to hand a command (a refused file must stay as it was: checked on the copy)."""
    out = str(tmp_path / "given.kv")
    shutil.copy(path, out)
    return out


def test_a_file_of_another_checkpoint_is_refused(models, ckpt_factory, paddle_file, tmp_path):
    other, _ = ckpt_factory("tiny-other-seed", tie_word_embeddings=False, seed=12)
    path, ids = copy(paddle_file[0], tmp_path), paddle_file[1]
    r = run_cli("generate", "--model", other, "--input-ids", ids_arg(ids), "--prompt-cache", path)
    assert refused(r) == (f"error: {path}: saved by another model: '{fingerprint(models['paddle'].source)}', this "
                          f"one is '{fingerprint(other)}'")
    assert open(path, "rb").read() == open(paddle_file[0], "rb").read()


def test_a_paddle_file_is_refused_by_onnx_runtime(models, paddle_file, tmp_path):
    path, ids = copy(paddle_file[0], tmp_path), paddle_file[1]
    r = cli("onnx", models, "--input-ids", ids_arg(ids), "--prompt-cache", path)
    assert refused(r) == (f"error: {path}: saved by another export: 'paddle eager', this one is "
                          f"'{models['onnx'].identity['export']}'")


def test_a_file_of_the_float_cache_is_refused_by_an_int8_cache_export(models, int8_dir, tmp_path):
    ids = prompt(20, models["onnx"].config.vocab_size, seed=13)
    path = str(tmp_path / "fp32.kv")
    generate(models["onnx"], ids, GenerationConfig(max_new_tokens=0), PromptCache(path))
    r = run_cli_onnx("generate", "--model", int8_dir, "--input-ids", ids_arg(ids), "--prompt-cache", path)
    assert refused(r) == f"error: {path}: saved by another kv dtype: 'float32', this one is 'int8'"


def test_a_truncated_file_is_refused(models, paddle_file, tmp_path):
    path, ids = copy(paddle_file[0], tmp_path), paddle_file[1]
    whole = SafetensorsFile(path)
    size = os.path.getsize(path) - 100
    os.truncate(path, size)
    name, info = next((n, i) for n, i in whole.tensors.items() if whole._data_start + i.end > size)
    r = run_cli("generate", "--model", models["paddle"].source, "--input-ids", ids_arg(ids), "--prompt-cache", path)
    assert refused(r) == (f"error: {path}: file is truncated: tensor '{name}' ends at byte "
                          f"{whole._data_start + info.end} but the file has {size} bytes")


def test_a_file_that_is_not_safetensors_is_refused(models, tmp_path):
    path = tmp_path / "notes.kv"
    path.write_bytes(b"these are not the tensors you are looking for\n")
    n = int.from_bytes(b"these ar", "little")
    r = cli("onnx", models, "--input-ids", "5,6,7", "--prompt-cache", str(path))
    assert refused(r) == (f"error: {path}: not a safetensors file or truncated (header length {n}, file size "
                          f"{path.stat().st_size})")


def test_a_safetensors_file_that_is_not_a_prompt_cache_is_refused(models, tiny_ckpt, tmp_path):
    path = copy(os.path.join(tiny_ckpt[0], "model.safetensors"), tmp_path)
    r = cli("onnx", models, "--input-ids", "5,6,7", "--prompt-cache", path)
    assert refused(r) == (f"error: {path}: not a prompt KV file of ernie-paddle (format 'paddle', kind None; "
                          f"expected 'ernie-paddle-kv/1', 'prompt')")
    assert open(path, "rb").read() == open(os.path.join(tiny_ckpt[0], "model.safetensors"), "rb").read()


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_a_folder_is_refused_before_the_model_loads(models, kind, tmp_path):
    prog = "ernie-onnx" if kind == "onnx" else "ernie-paddle"
    r = cli(kind, models, "--input-ids", "5,6,7", "--prompt-cache", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"{prog} generate: error: argument --prompt-cache: {tmp_path}: is a "
                                                 f"folder; give a file name")


def test_a_failed_write_leaves_the_old_file_whole(models, monkeypatch, tmp_path):
    model = models["onnx"]
    ids = prompt(20, model.config.vocab_size, seed=14)
    path = str(tmp_path / "p.kv")
    generate(model, ids, GenerationConfig(max_new_tokens=0), PromptCache(path))
    before = open(path, "rb").read()

    def half_then_fail(tmp, arrays, meta):
        with open(tmp, "wb") as f:
            f.write(before[:len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kv_file, "write_arrays", half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        generate(model, ids + [5, 6], gen(), PromptCache(path))
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["p.kv"] and not glob.glob(str(tmp_path / ".*"))

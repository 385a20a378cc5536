"""Bad input to every command: one `error:` line naming the argument, file or field, exit status 2, no traceback.

Checks that must come before any model is loaded run on checkpoints whose weights cannot be read: if the error
printed is the one about the argument (not about the weights), the argument was checked first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from ernie_paddle.cli.args import default_model_dir

from conftest import run_cli


def run_onnx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_paddle.cli.onnx_cli", *args], capture_output=True, text=True,
                          timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a run that must have refused its input."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error: " in ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def unloadable(tiny_ckpt, tmp_path_factory) -> str:
    """The tiny checkpoint with its weights file cut short: loading it fails, so any other error came first."""
    d = str(tmp_path_factory.mktemp("bad") / "ck")
    shutil.copytree(tiny_ckpt[0], d)
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    return d


@pytest.fixture(scope="module")
def shipped_unloadable(tmp_path_factory) -> str:
    """The shipped model's config and tokenizer, with a weights file that cannot be read."""
    d = tmp_path_factory.mktemp("shipped") / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_dir(), f), d / f)
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    return str(d)


@pytest.fixture(scope="module")
def onnx_folder(tiny_ckpt, tmp_path_factory) -> str:
    from ernie_paddle.export.pipeline import export

    out = str(tmp_path_factory.mktemp("onnx") / "tiny")
    export(tiny_ckpt[0], out, verify=False)
    return out


# ---- refused as the arguments are read (argparse's `PROG: error: argument --x: ...`) -------------------------------
@pytest.mark.parametrize("argv,message", [
    (["memory", "--preset", "tiny", "--precision", "int4", "--context", "8", "--device-memory", "lots"],
     "memory: error: argument --device-memory: expected a positive size like 24GB, 24GiB or 500MB, got 'lots'"),
    (["memory", "--preset", "tiny", "--precision", "int4", "--context", "0"],
     "memory: error: argument --context: must be a positive integer, got 0"),
    (["memory", "--preset", "tiny", "--precision", "int4", "--context", "-5"],
     "memory: error: argument --context: must be a positive integer, got -5"),
    (["memory", "--preset", "tiny", "--precision", "int4", "--context", "8", "--batch", "0"],
     "memory: error: argument --batch: must be a positive integer, got 0"),
    (["memory", "--preset", "tiny", "--precision", "int4", "--context", "8", "--block-size", "7"],
     "memory: error: argument --block-size: must be a power of two >= 16 (MatMulNBits), got 7"),
    (["memory", "--preset", "huge", "--precision", "int4", "--context", "8"],
     "memory: error: argument --preset: invalid choice: 'huge'"),
    (["memory", "--model", "{file}", "--precision", "int4", "--context", "8"],
     "memory: error: argument --model: {file}: not a folder"),
    (["make-checkpoint", "--preset", "tiny", "--layout", "pt", "--out", "{tmp}/x", "--num-layers", "0"],
     "make-checkpoint: error: argument --num-layers: must be a positive integer, got 0"),
    (["make-checkpoint", "--preset", "tiny", "--layout", "pt", "--out", "{tmp}/x", "--max-shard-size", "5 potatoes"],
     "make-checkpoint: error: argument --max-shard-size: expected a positive size"),
    (["make-checkpoint", "--preset", "tiny", "--layout", "pt", "--out", "{tmp}/x", "--seed", "-1"],
     "make-checkpoint: error: argument --seed: must be a non-negative integer, got -1"),
    (["generate", "--input-ids", "1", "--do-sample", "--seed", "-1"],
     "generate: error: argument --seed: must be a non-negative integer, got -1"),
    (["parity", "--greedy-tokens", "-1"], "parity: error: argument --greedy-tokens: must be a non-negative integer"),
    (["generate", "--input-ids", "1,,2"], "generate: error: argument --input-ids: an empty id between commas"),
    (["generate", "--input-ids", "1,2,"], "generate: error: argument --input-ids: an empty id between commas"),
    (["generate", "--input-ids", ""], "generate: error: argument --input-ids: no token ids given"),
    (["generate", "--input-ids", "1", "--stop-ids", "2,x"],
     "generate: error: argument --stop-ids: expected comma-separated integers like 1,2,3, got '2,x'"),
    (["generate", "--model", "{tmp}/nothere", "--input-ids", "1"],
     "generate: error: argument --model: {tmp}/nothere: no such folder"),
    (["generate", "--model", "{file}", "--input-ids", "1"], "generate: error: argument --model: {file}: not a folder"),
    (["generate", "--input-ids", "1", "--tools", "{file}"],
     "generate: error: argument --tools: {file}: not JSON (Expecting value: line 1 column 1 (char 0))"),
    (["generate", "--input-ids", "1", "--tools", "{tmp}/missing.json"],
     "generate: error: argument --tools: {tmp}/missing.json: cannot read it as UTF-8 text"),
    (["logits", "--input-ids", "1", "--out", "{tmp}"], "logits: error: argument --out: {tmp}: is a folder"),
    (["export", "--out", "{tmp}/o", "--block-size", "7"],
     "export: error: argument --block-size: must be a power of two >= 16 (MatMulNBits), got 7"),
    (["export", "--out", "{tmp}/o", "--precision", "int3"], "export: error: argument --precision: invalid choice"),
    (["parity", "--prompts", "{tmp}/missing.txt"], "parity: error: argument --prompts: {tmp}/missing.txt: no such file"),
    (["parity", "--onnx", "{tmp}/missing"], "parity: error: argument --onnx: {tmp}/missing: no such folder"),
    (["convert", "--model", "{tmp}/missing", "--out", "{tmp}/o", "--layout", "pt"],
     "convert: error: argument --model: {tmp}/missing: no such folder"),
])
def test_bad_arguments_are_refused_as_they_are_read(tmp_path, argv, message):
    (tmp_path / "f.txt").write_text("x")
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "f.txt"))  # noqa: E731
    r = run_cli(*map(fill, argv))
    assert fill(message) in error_line(r)
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_onnx_threads_must_be_positive(onnx_folder):
    r = run_onnx("generate", "--model", onnx_folder, "--input-ids", "1,2", "--threads", "-3")
    assert "ernie-onnx generate: error: argument --threads: must be a positive integer, got -3" in error_line(r)
    r = run_onnx("generate", "--model", onnx_folder, "--input-ids", "1,2", "--show-reasoning")  # chat flags too
    assert error_line(r) == "error: --show-reasoning needs --chat (it is for the chat template)"


@pytest.mark.parametrize("content,message", [
    ('{"type": "function"}', "expected a JSON list of tool definitions, got an object"),
    ('[{"type": "function"}, "get_weather"]', "tool 2 is a string, not an object"),
])
def test_tools_file_must_be_a_list_of_objects(tmp_path, content, message):
    (tmp_path / "tools.json").write_text(content)
    r = run_cli("generate", "--input-ids", "1", "--chat", "--tools", str(tmp_path / "tools.json"))
    assert error_line(r) == f"ernie-paddle generate: error: argument --tools: {tmp_path / 'tools.json'}: {message}"


# ---- refused before the weights are read ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--input-ids", "1,2", "--stop-ids", "7,999999"],
     "error: --stop-ids: token id 999999 at position 1 is out of range for vocab_size 512"),
    (["--input-ids", "1,512"], "error: --input-ids: token id 512 at position 1 is out of range for vocab_size 512"),
    (["--input-ids", "1,-2"], "error: --input-ids: token id -2 at position 1 is out of range for vocab_size 512"),
    (["--input-ids", "1", "--max-new-tokens", "-3"], "error: max_new_tokens must be a non-negative integer, got -3"),
    (["--input-ids", "1", "--prefill-chunk", "0"], "error: prefill_chunk must be a positive integer, got 0"),
    (["--input-ids", "1", "--do-sample", "--temperature", "0"], "error: temperature must be > 0, got 0.0"),
    (["--input-ids", "1", "--do-sample", "--top-p", "2"], "error: top_p must be in (0, 1], got 2.0"),
    (["--input-ids", "1", "--do-sample", "--top-k", "-1"], "error: top_k must be a non-negative integer, got -1"),
    (["--input-ids", "1", "--chat"], "error: --chat needs --prompt (the chat template is text)"),
    (["--input-ids", "1", "--system", "Be brief."], "error: --system needs --chat (it is for the chat template)"),
    (["--prompt", "x", "--show-reasoning"], "error: --show-reasoning needs --chat (it is for the chat template)"),
    (["--input-ids", "1", "--device", "tpu"], "error: --device tpu: The device must be a string which is like 'cpu'"),
])
def test_generate_checks_before_loading(unloadable, extra, message):
    r = run_cli("generate", "--model", unloadable, *extra)
    assert error_line(r) == message or error_line(r).startswith(message), r.stderr


def test_gpu_device_on_a_cpu_build(unloadable):
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle build has CUDA: --device gpu is valid here")
    r = run_cli("generate", "--model", unloadable, "--input-ids", "1", "--device", "gpu")
    assert error_line(r) == ("error: --device gpu: this Paddle build has no CUDA support; use --device cpu, or "
                             "install Paddle's GPU build")
    r = run_cli("logits", "--model", unloadable, "--input-ids", "1", "--device", "gpu:1", "--out", "x.npy")
    assert error_line(r).startswith("error: --device gpu:1: this Paddle build has no CUDA support")


def test_logits_checks_ids_before_loading(unloadable, tmp_path):
    r = run_cli("logits", "--model", unloadable, "--input-ids", "1,600", "--out", str(tmp_path / "l.npy"))
    assert error_line(r) == "error: --input-ids: token id 600 at position 1 is out of range for vocab_size 512"
    assert os.listdir(tmp_path) == []


def test_text_prompt_errors(shipped_unloadable, tmp_path):
    r = run_cli("generate", "--model", shipped_unloadable, "--prompt", "ROMEO:", "--do-sample", "--top-p", "2")
    assert error_line(r) == "error: top_p must be in (0, 1], got 2.0"
    assert r.stdout == ""  # the prompt is not echoed, so the error is not glued to it
    r = run_cli("generate", "--model", shipped_unloadable, "--prompt", "")
    assert error_line(r) == "error: --prompt is empty: give some text to continue"
    (tmp_path / "p.txt").write_bytes(b"ROMEO: \xff\xfe\n")
    r = run_cli("generate", "--model", shipped_unloadable, "--prompt-file", str(tmp_path / "p.txt"))
    assert error_line(r).startswith(f"error: --prompt-file {tmp_path / 'p.txt'}: cannot read it as UTF-8 text")


def test_corrupt_tokenizer_config_is_named(shipped_unloadable, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(shipped_unloadable, d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 4096,')
    r = run_cli("generate", "--model", str(d), "--prompt", "ROMEO:")
    assert error_line(r).startswith(f"error: {d / 'tokenizer_config.json'}: cannot read it as JSON")


def test_a_broken_chat_template_is_named(shipped_unloadable, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(shipped_unloadable, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    r = run_cli("generate", "--model", str(d), "--prompt", "ROMEO:", "--chat")
    assert error_line(r) == (f"error: {d / 'tokenizer_config.json'} (chat_template): chat template syntax error at "
                             f"line 1: Unexpected end of template. Jinja was looking for the following tags: 'endfor' "
                             f"or 'else'. The innermost block that needs to be closed is 'for'.")
    (d / "chat_template.jinja").write_text("{{ raise_exception('this model takes no system message') }}")
    r = run_cli("generate", "--model", str(d), "--prompt", "ROMEO:", "--chat", "--system", "Be brief.")
    assert error_line(r) == f"error: {d / 'chat_template.jinja'}: this model takes no system message"
    del config["chat_template"]  # none at all: ERNIE-4.5's, and one warning line that says so
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    os.remove(d / "chat_template.jinja")
    r = run_cli("generate", "--model", str(d), "--prompt", "ROMEO:", "--chat")
    assert r.stderr.splitlines()[0] == (f"warning: {d}: no chat template in tokenizer_config.json or "
                                        f"chat_template.jinja; using the built-in ERNIE-4.5 chat template")
    assert error_line(r).startswith(f"error: {d / 'model.safetensors'}")  # then the weights that cannot be read


def test_parity_prompts_file_must_be_utf8(shipped_unloadable, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"ROMEO:\n\xff\xfe\n")
    r = run_cli("parity", "--model", shipped_unloadable, "--prompts", str(tmp_path / "p.txt"))
    assert error_line(r).startswith(f"error: --prompts {tmp_path / 'p.txt'}: cannot read it as UTF-8 text")
    (tmp_path / "ids.txt").write_text("1,2,3\n5,99999\n")
    r = run_cli("parity", "--model", shipped_unloadable, "--prompts", str(tmp_path / "ids.txt"))
    assert error_line(r) == f"error: --prompts {tmp_path / 'ids.txt'}: prompt 2: token id 99999 at position 1 is " \
                            f"out of range for vocab_size 2048"


def test_sampling_flags_without_do_sample_warn(tiny_ckpt):
    r = run_cli("generate", "--model", tiny_ckpt[0], "--input-ids", "5,6,7", "--max-new-tokens", "3",
                "--temperature", "0.5", "--seed", "4", "--json")
    greedy = run_cli("generate", "--model", tiny_ckpt[0], "--input-ids", "5,6,7", "--max-new-tokens", "3", "--json")
    assert r.returncode == greedy.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == ("warning: --temperature, --seed have no effect without --do-sample "
                                        "(decoding is greedy)")
    assert "warning" not in greedy.stderr
    assert json.loads(r.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]


# ---- outputs -------------------------------------------------------------------------------------------------------
def test_outputs_refused_before_any_work(tiny_ckpt, tmp_path):
    (tmp_path / "file").write_text("keep")
    r = run_cli("export", "--model", tiny_ckpt[0], "--out", "")
    assert error_line(r) == "error: the output folder name is empty; give a new folder to create"
    assert "export:" not in r.stderr  # nothing started
    r = run_cli("export", "--model", tiny_ckpt[0], "--out", str(tmp_path / "file"))
    assert error_line(r) == f"error: {tmp_path / 'file'}: output folder already exists; choose a new one"
    r = run_cli("convert", "--model", tiny_ckpt[0], "--out", "", "--layout", "pt")
    assert error_line(r) == "error: the output directory name is empty; give a new directory to create"
    r = run_cli("make-checkpoint", "--preset", "tiny", "--layout", "pt", "--out", str(tmp_path / "file"))
    assert error_line(r) == f"error: {tmp_path / 'file'}: output directory already exists; choose a new one"
    assert "make-checkpoint:" not in r.stderr
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "keep"


# ---- exported folders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_external_data_is_named(onnx_folder, tmp_path, damage):
    d = tmp_path / "onnx"
    shutil.copytree(onnx_folder, d)
    data = d / "model.onnx.data"
    size = os.path.getsize(data)
    if damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(size // 2)
    else:
        os.remove(data)
    r = run_onnx("generate", "--model", str(d), "--input-ids", "1,2")
    line = error_line(r)
    assert r.stderr.strip() == line  # no raw ONNX Runtime log line besides it
    if damage == "truncated":
        assert re.fullmatch(rf"error: {re.escape(str(data))}: truncated: {size // 2} bytes, the graph's tensors need "
                            rf"{size}", line), line
    else:
        assert line.startswith(f"error: {data}: missing")

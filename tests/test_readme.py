"""The README stays true: every command in its ```bash blocks and every ```python block runs, in order, and does
what it is there for: the generated text is the one generation gives in-process, the export folder holds its graph
and a manifest naming the precision asked for, the parity report names that folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.files import MANIFEST, ONNX_MODEL
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.text.tokenizer import ErnieTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_MODULES = {"ernie-paddle": "ernie_paddle.cli.paddle_cli", "ernie-onnx": "ernie_paddle.cli.onnx_cli"}


def readme_blocks(language: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    return [line.strip() for block in readme_blocks("bash") for line in block.splitlines() if line.strip()]


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def greedy_text(model_dir: str | None, prompt: str, max_new_tokens: int) -> str:
    """The continuation `generate` gives in this process: the Paddle model (model_dir None: the shipped one) or,
    for an exported folder, the ONNX Runtime model."""
    if model_dir is None:
        from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

        model_dir = default_model_dir()
        model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir)
    else:
        from ernie_paddle.ort.runtime import OnnxCausalLM

        model = OnnxCausalLM(model_dir)
    tok = ErnieTokenizer(model_dir)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=tok.stop_ids())
    return tok.decode(generate(model, tok.encode(prompt), gen))


def check_generate(argv: list[str], stdout: str, cwd) -> str:
    """`generate --prompt P` streams the prompt then its greedy continuation: both, exactly, then a newline."""
    assert "--prompt" in argv and "--do-sample" not in argv and "--chat" not in argv, argv  # what this checks
    folder = option(argv, "--model")
    prompt, n = option(argv, "--prompt"), int(option(argv, "--max-new-tokens", "128"))
    expected = greedy_text(None if folder is None else str(cwd / folder), prompt, n)
    assert expected.strip()
    assert stdout == prompt + expected + "\n", argv
    return expected


def check_export(argv: list[str], cwd) -> None:
    """The folder holds its graph and a manifest naming the flavour and precision asked for."""
    out = cwd / option(argv, "--out")
    manifest = json.load(open(out / MANIFEST))
    assert (out / manifest["model_file"]).is_file() and manifest["model_file"] == ONNX_MODEL
    assert manifest["precision"] == option(argv, "--precision", "fp32")
    assert manifest["flavor"] == option(argv, "--flavor", "ort")


def check_parity(argv: list[str], stdout: str, cwd) -> None:
    """The report compares Paddle with the folder given, on every prompt, and writes the JSON asked for."""
    report = json.load(open(cwd / option(argv, "--json")))
    folder = option(argv, "--onnx")
    precision = json.load(open(cwd / folder / MANIFEST))["precision"]
    (candidate,) = report["candidates"]
    assert candidate["name"].startswith(f"onnx:{folder} ") and precision in candidate["name"], candidate["name"]
    assert report["reference"].startswith("paddle fp32")
    assert len(candidate["greedy_identical_tokens"]) == report["prompts"] == len(report["prompt_tokens"])
    assert all(0 <= n <= report["greedy_tokens"] for n in candidate["greedy_identical_tokens"])
    assert 0.0 <= candidate["top1_agreement"] <= 1.0 and candidate["kl_divergence"] >= 0.0
    assert len(candidate["router_agreement"]) == len(report["moe_layers"])
    assert folder in stdout


def test_readme_bash_commands_run(tmp_path):
    commands = readme_commands()
    assert any(c.startswith("ernie-paddle generate --prompt") for c in commands)  # the main job is there
    checked = set()
    for cmd in commands:
        if cmd.startswith("pip "):
            continue  # installing is what .ci/run does before the tests
        argv = shlex.split(cmd)
        assert argv[0] in CLI_MODULES, f"README command not covered by this test: {cmd}"
        r = subprocess.run([sys.executable, "-m", CLI_MODULES[argv[0]], *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        if argv[1] == "generate":
            check_generate(argv, r.stdout, tmp_path)
            assert "tokens/s" in r.stderr, cmd
        elif argv[1] == "export":
            check_export(argv, tmp_path)
        elif argv[1] == "parity":
            check_parity(argv, r.stdout, tmp_path)
        else:
            raise AssertionError(f"README command not covered by this test: {cmd}")
        checked.add((argv[0], argv[1]))
    assert checked == {("ernie-paddle", "generate"), ("ernie-paddle", "export"), ("ernie-onnx", "generate"),
                       ("ernie-paddle", "parity")}


def test_readme_python_examples_run(tmp_path):
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        if '"shakespeare-onnx"' in block and not (tmp_path / "shakespeare-onnx").is_dir():  # the README's export
            (export,) = [c for c in readme_commands() if c.startswith("ernie-paddle export ")]
            r = subprocess.run([sys.executable, "-m", CLI_MODULES["ernie-paddle"], *shlex.split(export)[1:]],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{block}\n{r.stderr}"
        # each block prints the greedy continuation of its prompt: the one generation gives in this process
        (prompt,) = set(re.findall(r'tok\.encode\("([^"]*)"\)', block))
        (n,) = set(re.findall(r"max_new_tokens=(\d+)", block))
        folder = str(tmp_path / "shakespeare-onnx") if "OnnxCausalLM" in block else None
        expected = greedy_text(folder, prompt, int(n))
        assert expected.strip() and r.stdout == expected + "\n", block
    assert (tmp_path / "ckpt-pt" / "config.json").is_file()  # the Paddle block's save_pretrained

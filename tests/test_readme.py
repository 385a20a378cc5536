"""The README stays true: every command in its ```bash blocks runs, in order, and succeeds."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_bash_commands_run(tmp_path):
    commands = readme_commands()
    assert any(c.startswith("ernie-paddle generate --prompt") for c in commands)  # the main job is there
    for cmd in commands:
        if cmd.startswith("pip "):
            continue  # installing is what .ci/run does before the tests
        argv = shlex.split(cmd)
        assert argv[0] in ("ernie-paddle", "ernie-onnx"), f"README command not covered by this test: {cmd}"
        module = {"ernie-paddle": "ernie_paddle.cli.paddle_cli", "ernie-onnx": "ernie_paddle.cli.onnx_cli"}[argv[0]]
        r = subprocess.run([sys.executable, "-m", module, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        if "generate" in argv and "--prompt" in argv:
            assert r.stdout.strip() and "tokens/s" in r.stderr, cmd


def test_readme_python_examples_run(tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        if '"shakespeare-onnx"' in block and not (tmp_path / "shakespeare-onnx").is_dir():  # the README's export
            r = subprocess.run([sys.executable, "-m", "ernie_paddle.cli.paddle_cli", "export", "--out", "shakespeare-onnx",
                                "--precision", "int4"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{block}\n{r.stderr}"
        assert r.stdout.strip(), block
    assert (tmp_path / "ckpt-pt" / "config.json").is_file()

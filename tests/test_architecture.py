"""The layout's promise: everything that imports Paddle lives in `ernie_paddle.paddle`; every other module, the
ONNX Runtime runtime, the server, the text side, the checkpoint reader and the exporter among them, imports with
Paddle absent. The `tools/` programs may start Paddle inside the runs that measure it, never at import."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

import ernie_paddle

PACKAGE = os.path.dirname(ernie_paddle.__file__)
ROOT = os.path.dirname(PACKAGE)
PADDLE_PACKAGE = "ernie_paddle.paddle"
BLOCKED = ("paddle", "paddle2onnx")

# Run in a child: block Paddle at the import system, import each module named on stdin, report the failures.
CHECKER = """
import importlib, importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in %r:
            raise ImportError('Paddle is blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
failed = {}
for m in json.load(sys.stdin):
    try:
        importlib.import_module(m)
    except Exception as e:
        failed[m] = f'{type(e).__name__}: {e}'
print(json.dumps({'failed': failed, 'paddle_loaded': sorted(k for k in sys.modules if k.split('.')[0] in %r)}))
""" % (BLOCKED, BLOCKED)


def source_modules() -> dict[str, str]:
    """Every module of the installed project, by dotted name, with its file: ernie_paddle/, export/ and tools/
    (installed as ernie_paddle.export and ernie_paddle.tools)."""
    out = {}
    for folder, prefix in ((PACKAGE, "ernie_paddle"), (os.path.join(ROOT, "export"), "ernie_paddle.export"),
                           (os.path.join(ROOT, "tools"), "ernie_paddle.tools")):
        for dirpath, _, files in os.walk(folder):
            rel = os.path.relpath(dirpath, folder)
            parts = [] if rel == "." else rel.split(os.sep)
            if prefix == "ernie_paddle" and parts[:1] in (["export"], ["tools"]):
                continue  # an installed copy's mapped folders are walked as export/ and tools/
            for f in files:
                if f.endswith(".py"):
                    leaf = [] if f == "__init__.py" else [f[:-3]]
                    out[".".join([prefix, *parts, *leaf])] = os.path.join(dirpath, f)
    return out


def outside_paddle(modules: dict[str, str]) -> list[str]:
    return sorted(m for m in modules if m != PADDLE_PACKAGE and not m.startswith(PADDLE_PACKAGE + "."))


def import_blocked(modules: list[str], extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", CHECKER], input=json.dumps(modules), capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def paddle_imports(path: str) -> list[int]:
    """Lines of `path` that import Paddle or paddle2onnx, at any depth (a function's lazy import counts)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n.split(".")[0] in BLOCKED for n in names):
            lines.append(node.lineno)
    return lines


def test_the_walk_finds_every_module_and_the_paddle_package():
    modules = source_modules()
    assert PADDLE_PACKAGE + ".modeling" in modules and "ernie_paddle.ort.runtime" in modules
    assert "ernie_paddle.serving.app" in modules and "ernie_paddle.export.ort_graph" in modules
    assert "ernie_paddle.tools.bench" in modules and "ernie_paddle.text.tokenizer" in modules
    n_files = sum(len([f for f in fs if f.endswith(".py")]) for d in ("ernie_paddle", "export", "tools")
                  for _, _, fs in os.walk(os.path.join(ROOT, d)))
    assert len(modules) == n_files  # a new file is checked without anyone listing it


def test_every_module_outside_the_paddle_package_imports_with_paddle_blocked():
    pytest.importorskip("fastapi", reason="the server's modules need the serve extra")
    modules = outside_paddle(source_modules())
    result = import_blocked(modules)
    assert result["failed"] == {}
    assert result["paddle_loaded"] == []


def test_no_library_module_outside_the_paddle_package_imports_paddle_even_lazily():
    """ernie_paddle/ and export/ reach Paddle only through `ernie_paddle.paddle` (tools/ are programs)."""
    modules = source_modules()
    found = {m: paddle_imports(modules[m]) for m in outside_paddle(modules) if not m.startswith("ernie_paddle.tools")}
    assert {m: lines for m, lines in found.items() if lines} == {}


def test_the_checks_catch_a_stray_paddle_import(tmp_path):
    stray = tmp_path / "stray_module.py"
    stray.write_text("import numpy\n\n\ndef f():\n    return 1\n\n\nimport paddle.nn  # the stray import\n")
    result = import_blocked(["stray_module", "ernie_paddle.ort.runtime"], extra_path=str(tmp_path))
    assert list(result["failed"]) == ["stray_module"]
    assert result["failed"]["stray_module"] == "ImportError: Paddle is blocked for this test: paddle"
    assert paddle_imports(str(stray)) == [8]
    lazy = tmp_path / "lazy_module.py"
    lazy.write_text("def f():\n    from paddle2onnx import export\n    return export\n")
    assert import_blocked(["lazy_module"], extra_path=str(tmp_path))["failed"] == {}  # only the AST check sees it
    assert paddle_imports(str(lazy)) == [2]

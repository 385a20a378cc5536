"""Packaging: `export/` and `tools/` install under `ernie_paddle.`, never as generic top-level names."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile


def test_installed_package_has_no_generic_top_level_names(tmp_path):
    code = ("import importlib.util as u, ernie_paddle.export, ernie_paddle.tools.bench_moe, sys; "
            "print(u.find_spec('export'), u.find_spec('tools'), 'paddle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "False"]  # and importing them pulls in no Paddle


def test_wheel_maps_folders_into_the_namespace(tmp_path):
    root = __file__.rsplit("/tests/", 1)[0]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), root], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("ernie_paddle-*.whl")
    import ernie_paddle

    assert wheel.name.startswith(f"ernie_paddle-{ernie_paddle.__version__}-")  # setup.py reads the one version
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ernie_paddle", next(t for t in tops if t.endswith(".dist-info"))}
    for f in ("ernie_paddle/export/__init__.py", "ernie_paddle/tools/bench_moe.py", "ernie_paddle/paddle/modeling.py",
              "ernie_paddle/models/ernie-4.5-shakespeare/model.safetensors",
              "ernie_paddle/models/ernie-4.5-shakespeare/tokenizer.model", "ernie_paddle/data/tinyshakespeare.txt"):
        assert f in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ernie-paddle = ernie_paddle.cli.paddle_cli:main" in entry and "ernie-onnx = ernie_paddle.cli.onnx_cli:main" in entry
    # a plain (non-editable) install finds the shipped corpus inside the package, with nothing beside it
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import hashlib, ernie_paddle.corpus as c; "
            "print(c.DEFAULT_CORPUS); print(hashlib.sha256(c.read_corpus().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    path, digest = out.stdout.split()
    assert path == str(site / "ernie_paddle" / "data" / "tinyshakespeare.txt")
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # ernie_paddle/data/README.md

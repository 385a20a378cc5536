"""Atomic outputs: a file or folder appears whole, with the usual permissions, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from ernie_paddle.atomic import atomic_dir, atomic_path, check_new_dir, write_json
from ernie_paddle.errors import ErnieError, ExportError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_gives_usual_permissions_and_cleans_up(tmp_path, umask_022):
    out = tmp_path / "sub" / "r.json"
    write_json(str(out), {"a": 1})
    assert out.read_text() == '{\n  "a": 1\n}' and mode(out) == 0o644  # mkstemp alone would make it 0600
    os.umask(0o077)
    write_json(str(tmp_path / "private.json"), [])
    assert mode(tmp_path / "private.json") == 0o600  # the umask still rules
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(out)) as tmp:
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert out.read_text() == '{\n  "a": 1\n}' and sorted(os.listdir(out.parent)) == ["r.json"]
    with pytest.raises(ErnieError, match="the output path is empty"):
        write_json("", {})
    with pytest.raises(ErnieError, match=f"{tmp_path}: is a folder; give a file name"):
        write_json(str(tmp_path), {})


def test_atomic_dir_renames_on_success_with_usual_permissions(tmp_path, umask_022):
    out = tmp_path / "new" / "model"
    with atomic_dir(str(out), prefix=".tmp-export-") as tmp:
        assert os.path.basename(tmp).startswith(".tmp-export-") and os.path.dirname(tmp) == str(out.parent)
        open(os.path.join(tmp, "a.txt"), "w").write("x")
    assert os.listdir(out) == ["a.txt"] and mode(out) == 0o755  # not mkdtemp's 0700
    assert os.listdir(out.parent) == ["model"]
    (tmp_path / "empty").mkdir()
    with atomic_dir(str(tmp_path / "empty")) as tmp:  # an empty folder the user made is filled
        open(os.path.join(tmp, "b"), "w").close()
    assert os.listdir(tmp_path / "empty") == ["b"]
    with atomic_dir(str(out), overwrite=True) as tmp:  # save_pretrained's semantics
        open(os.path.join(tmp, "c"), "w").close()
    assert os.listdir(out) == ["c"] and os.listdir(out.parent) == ["model"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "d"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(out) == ["c"] and os.listdir(out.parent) == ["model"]  # the old output is kept whole
    (tmp_path / "f").write_text("old")
    with atomic_dir(str(tmp_path / "f"), overwrite=True) as tmp:  # a file in the way is replaced too
        open(os.path.join(tmp, "e"), "w").close()
    assert os.listdir(tmp_path / "f") == ["e"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_atomic_dir_removes_everything_on_any_exception(tmp_path, exc):
    with pytest.raises(type(exc)):
        with atomic_dir(str(tmp_path / "out")) as tmp:
            os.makedirs(os.path.join(tmp, "deep", "er"))
            open(os.path.join(tmp, "deep", "er", "w.bin"), "wb").write(b"0" * 1000)
            raise exc
    assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_before_any_work(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ExportError, match=f"^{tmp_path / 'full'}: output folder already exists; choose a new one$"):
        with atomic_dir(str(tmp_path / "full"), error=ExportError):
            pytest.fail("the block must not run")
    with pytest.raises(ErnieError, match=f"^{tmp_path / 'file'}: output directory already exists; choose a new"):
        check_new_dir(str(tmp_path / "file"), noun="directory")
    with pytest.raises(ExportError, match="^the output folder name is empty; give a new folder to create$"):
        with atomic_dir("", error=ExportError):
            pytest.fail("the block must not run")
    assert sorted(os.listdir(tmp_path)) == ["file", "full"] and (tmp_path / "full" / "x").read_text() == "keep"

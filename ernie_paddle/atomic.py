"""Write-then-rename helpers: an interrupted or failed run never leaves a half-written output.

Every output of the project (files and folders) goes through `atomic_path` or `atomic_dir`: the work happens in a
hidden temporary entry beside the target, renamed into place only when complete and removed on any exception,
KeyboardInterrupt and the CLI's SIGTERM exception included (they are BaseExceptions, so cleanup uses `finally`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from typing import Iterator

from ernie_paddle.errors import ErnieError


def _umask() -> int:
    """The process umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_empty(path: str) -> None:
    if not path or not path.strip():
        raise ErnieError("the output path is empty; give a file or folder name")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file path beside `path`; it replaces `path` only if the block succeeds.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    _refuse_empty(path)
    if os.path.isdir(path):
        raise ErnieError(f"{path}: is a folder; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON to `path`, all or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)


def write_png(fig, path: str) -> None:
    """Save a matplotlib figure as a PNG at `path`, all or nothing, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.tight_layout()
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def check_new_dir(path: str, error: type[Exception] = ErnieError, noun: str = "folder") -> None:
    """Refuse an empty path, a `path` that exists and is not an empty folder (nothing is ever overwritten), or one
    that cannot be created because a file stands where one of its parent folders should be.

    Call it before any work starts; `atomic_dir` checks again. `error` is the caller's exception type and
    `noun` its word ("folder" for exports, "directory" for checkpoints), so messages stay as users know them.
    """
    if not path or not path.strip():
        raise error(f"the output {noun} name is empty; give a new {noun} to create")
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise error(f"{path}: output {noun} already exists; choose a new one")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise error(f"{path}: cannot create the output {noun}: {ancestor} is a file, not a {noun}")


@contextlib.contextmanager
def atomic_dir(path: str, *, prefix: str | None = None, overwrite: bool = False,
               error: type[Exception] = ErnieError, noun: str = "folder") -> Iterator[str]:
    """Yield a new hidden temporary folder beside `path`; renamed to `path` when the block succeeds, removed with
    everything in it when the block raises anything (KeyboardInterrupt and SIGTERM's exception included).

    `path` must not exist (an empty folder is replaced) unless `overwrite`, which replaces it when done.
    `prefix` names the temporary folder (default `.tmp-<name>-`); the finished folder gets the usual
    permissions (0777 less the umask), not mkdtemp's private 0700.
    """
    if overwrite:
        _refuse_empty(path)
    else:
        check_new_dir(path, error, noun)
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # named first and created inside the try: an interrupt that lands just after the folder appears (where
    # mkdtemp would still be returning its name) is cleaned up below
    tmp = os.path.join(parent, (prefix or f".tmp-{os.path.basename(target)}-") + secrets.token_hex(8))
    try:
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:  # not ours: never removed below
            name, tmp = tmp, None
            raise error(f"{name}: a temporary folder of that name already exists") from None
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if overwrite and os.path.lexists(target):  # the old output stays whole until the new one is in place
            aside = tmp + ".replaced"
            os.rename(target, aside)
            os.rename(tmp, target)
            _remove(aside)
        else:
            os.rename(tmp, target)
    finally:
        if tmp is not None and os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)

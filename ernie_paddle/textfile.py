"""Text files given on the command line (prompts, token ids, a training corpus), read one way."""

from __future__ import annotations

from .errors import InputError


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of `path`; an unreadable or non-UTF-8 file is an InputError starting with `what` (the
    argument that named it, e.g. "--prompt-file p.txt")."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: cannot read it as UTF-8 text ({e})") from None

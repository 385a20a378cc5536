"""Reading the text files users hand us (prompts, token ids, a corpus) and a folder's small JSON files
(config.json, tokenizer_config.json, manifest.json): one way, with errors that name the file."""

from __future__ import annotations

import json

from ernie_paddle.errors import ErnieError, InputError


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of `path`; an unreadable or non-UTF-8 file is an InputError starting with `what` (the
    argument that named it, e.g. "--prompt-file p.txt")."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: cannot read it as UTF-8 text ({e})") from None


def read_json_object(path: str, error: type[ErnieError]) -> dict:
    """The JSON object in `path`. Anything else (unreadable, not UTF-8, not JSON, not an object) raises `error`,
    the caller's kind, with a message naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return obj

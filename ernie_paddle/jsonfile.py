"""The small JSON files of a model folder (config.json, tokenizer_config.json, manifest.json), read one way."""

from __future__ import annotations

import json

from .errors import ErnieError


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

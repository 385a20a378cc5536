"""`generate --prompt-cache FILE`: one prompt's keys and values on disk, so a later run whose prompt starts with the
same tokens prefills only the rest (a document asked several questions, a conversation continued).

The file is a `kv_file` of kind PROMPT: the prompt's token ids and every layer's KV, stamped with the model's
identity. A run reuses the longest common prefix of the file's tokens and its prompt, all but the prompt's last
token at most (that one always runs, for its logits), then saves its own prompt in the file unless the file holds
exactly that prompt already.
"""

from __future__ import annotations

import os

import numpy as np

from ernie_paddle import kv_file
from ernie_paddle.causal_lm import Cache, CausalLM
from ernie_paddle.checkpoint.safetensors_io import SafetensorsFile
from ernie_paddle.errors import CheckpointError, InputError, KVFileError


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PromptCache:
    """A `generation.PrefillHook` over one prompt-cache file: `reuse` loads the file's matching prefix into the
    fresh cache, `prefilled` saves the prompt's KV (atomically). `cached_tokens`: the prompt tokens it supplied."""

    def __init__(self, path: str):
        self.path = path
        self.cached_tokens = 0
        self._saved: np.ndarray | None = None  # the file's token ids, once read

    def check(self) -> None:
        """Refuse a file that is not safetensors or is truncated now, before a model loads (what it was computed by
        is checked against the model in `reuse`)."""
        if os.path.isdir(self.path):
            raise KVFileError(f"{self.path}: is a folder; give a file name")
        if os.path.exists(self.path):
            try:
                SafetensorsFile(self.path)
            except CheckpointError as e:
                raise KVFileError(str(e)) from None

    def reuse(self, model: CausalLM, cache: Cache, prompts: list[np.ndarray]) -> int:
        prompt = self._one(prompts)
        if not os.path.exists(self.path):
            return 0
        tokens, layers, _ = kv_file.read(self.path, kv_file.PROMPT, model.identity)
        self._saved = tokens
        n = common_prefix(tokens, prompt[:-1])
        if n:
            model.write_kv(cache, 0, 0, [(k[:, :n], v[:, :n]) for k, v in layers])
        self.cached_tokens = n
        return n

    def prefilled(self, model: CausalLM, cache: Cache, prompts: list[np.ndarray]) -> None:
        prompt = self._one(prompts)
        if self._saved is not None and np.array_equal(self._saved, prompt):
            return
        kv_file.write(self.path, kv_file.PROMPT, model.identity, prompt, model.read_kv(cache, 0, 0, len(prompt)))
        self._saved = prompt

    def _one(self, prompts: list[np.ndarray]) -> np.ndarray:
        if len(prompts) != 1:
            raise InputError(f"--prompt-cache holds one prompt; {len(prompts)} were given")
        return np.asarray(prompts[0], np.int64)

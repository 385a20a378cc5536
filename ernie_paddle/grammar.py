"""Constrained decoding through llguidance: a JSON schema, any JSON object, or a forced tool call as a grammar, and
one matcher per sequence that masks the logits to the tokens the grammar allows and follows the chosen ones.

The grammar engine reads the model folder's `tokenizer.json` (built from `tokenizer.model` when the folder has
none), once per folder. JSON is written compactly (`", "` and `": "` as separators, no other whitespace), so a
sequence cannot spend its tokens on blank space. llguidance was chosen over xgrammar by `tools/grammar_bench.py`.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ernie_paddle import files
from ernie_paddle.errors import InputError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 65536  # a schema's JSON text beyond this is refused before it is compiled
TOOL_CALL = ("<tool_call>", "</tool_call>")  # ERNIE-4.5's tool-call block (text/chat_output.py reads it back)

_tokenizers: dict[tuple, Any] = {}
_lock = threading.Lock()


class GrammarError(InputError):
    """A schema or tool definition that does not compile into a grammar (or is too large)."""


def _llg():
    import llguidance

    return llguidance


def grammar_tokenizer(directory: str, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's tokenizer of a model folder, its masks `vocab_size` wide and `eos_ids` ending a grammar; cached
    per folder, since building the token trie is the expensive part."""
    key = (os.path.realpath(directory), vocab_size, tuple(eos_ids))
    with _lock:
        tok = _tokenizers.get(key)
        if tok is None:
            tok = _tokenizers[key] = _llg().LLTokenizer(_tokenizer_json(directory), n_vocab=vocab_size,
                                                        eos_token=list(eos_ids))
    return tok


def _tokenizer_json(directory: str) -> str:
    """The folder's tokenizer.json text, or one made from its SentencePiece model and added tokens."""
    path = os.path.join(directory, files.TOKENIZER_JSON)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    from ernie_paddle.export.tokenizer_json import tokenizer_json
    from ernie_paddle.text.tokenizer import _read_json_object, read_added_tokens

    config = _read_json_object(os.path.join(directory, files.TOKENIZER_CONFIG))
    by_id = {t.id: t for t in read_added_tokens(directory, config)}
    return json.dumps(tokenizer_json(os.path.join(directory, files.SPM_MODEL), sorted(by_id.values())))


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar: what a request's answer must match. `matcher()` starts a sequence on it."""

    kind: str  # "json_schema", "json_object" or "tool_call"
    grammar: str  # llguidance's grammar text
    vocab_size: int
    _start: Any  # an LLMatcher at the grammar's start, copied for each sequence

    def matcher(self) -> Matcher:
        """A fresh matcher for one sequence."""
        return Matcher(self._start.deep_copy(), self.vocab_size)


class Matcher:
    """One sequence's place in the grammar: the allowed tokens now, and the chosen ones consumed."""

    def __init__(self, matcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, np.int32)

    def bits(self) -> np.ndarray:
        """The grammar engine's mask of the tokens allowed next: int32 words, bit i of word w for token 32 w + i."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return self._bits

    def allowed(self) -> np.ndarray:
        """A bool [vocab_size] of the tokens the grammar allows next."""
        return np.unpackbits(self.bits().view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V] with every token the grammar forbids at -inf (unchanged when the matcher has failed)."""
        allowed = self.allowed()
        if self._m.is_error() or not allowed.any():
            return logits
        if len(logits) == self.vocab_size:
            return np.where(allowed, logits, np.float32(-np.inf))
        n = min(len(logits), self.vocab_size)
        out = np.full(logits.shape, -np.inf, np.float32)
        out[:n] = np.where(allowed[:n], logits[:n], np.float32(-np.inf))
        return out

    def consume(self, token: int) -> bool:
        """Follow a chosen token; False when the grammar does not allow it."""
        return bool(self._m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete: no token but an end of sequence can follow."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def compile_grammar(tokenizer, grammar: str, kind: str, vocab_size: int, what: str = "the grammar") -> Constraint:
    """The Constraint of llguidance grammar text; a GrammarError naming `what` and saying why when it does not
    compile."""
    llg = _llg()
    message = llg.LLMatcher.validate_grammar(grammar, tokenizer)
    if message and not message.startswith("WARNING"):
        raise GrammarError(f"{what} does not compile: {message}")
    start = llg.LLMatcher(tokenizer, grammar, log_level=0)
    if start.is_error():
        raise GrammarError(f"{what} does not compile: {start.get_error()}")
    return Constraint(kind, grammar, vocab_size, start)


def _checked_schema(schema: Any, what: str) -> str:
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{what} must be a JSON schema object, got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"{what} is too large: {len(text)} characters of JSON, at most {MAX_SCHEMA_CHARS}")
    return text


def json_schema(tokenizer, schema: Any, vocab_size: int, what: str = "the schema") -> Constraint:
    """Answers that are JSON valid against `schema`."""
    text = _checked_schema(schema, what)
    grammar = _llg().LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
    return compile_grammar(tokenizer, grammar, "json_schema", vocab_size, what)


def json_object(tokenizer, vocab_size: int) -> Constraint:
    """Answers that are one JSON object, of any content."""
    grammar = _llg().LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    return compile_grammar(tokenizer, grammar, "json_object", vocab_size)


def call_schema(tools: Sequence[dict]) -> dict:
    """The JSON schema of one call of any of `tools` (OpenAI tool definitions): {"name", "arguments"}."""
    def one(tool: dict) -> dict:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object"}
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    calls = [one(t) for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_call(tokenizer, tools: Sequence[dict], vocab_size: int, tag_ids: tuple[int | None, int | None] = (None, None)
              ) -> Constraint:
    """Answers that are one call of one of `tools`, in ERNIE-4.5's `<tool_call>` block; a tag that is a special
    token of the vocabulary (`tag_ids`: the tags' ids, None when absent) is matched as that token, else as text."""
    tag_ids = tuple(i if i is not None and tokenizer.is_special_token(i) else None for i in tag_ids)
    schema = {**call_schema(tools), "x-guidance": JSON_OPTIONS}
    _checked_schema(schema, "the tools' parameters")
    open_tag, close_tag = (f"<[{i}]>" if i is not None else json.dumps(t) for i, t in zip(tag_ids, TOOL_CALL))
    lark = f'start: {open_tag} "\\n" call "\\n" {close_tag}\ncall: %json {json.dumps(schema)}\n'
    grammar = _llg().LLMatcher.grammar_from_lark(lark)
    return compile_grammar(tokenizer, grammar, "tool_call", vocab_size, "the tools' parameters")


def folder_schema(directory: str, schema: Any, vocab_size: int, what: str = "the schema") -> Constraint:
    """The json_schema Constraint of a model folder's tokenizer (its stop ids end the grammar), as the command
    lines' --json-schema makes it."""
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer(directory)
    return json_schema(grammar_tokenizer(directory, max(vocab_size, tok.vocab_size), tok.stop_ids()), schema,
                       vocab_size, what)

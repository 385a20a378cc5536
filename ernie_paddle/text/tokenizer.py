"""The ERNIE-4.5 tokenizer: SentencePiece `tokenizer.model` (or `tokenizer.json`), its special and added tokens, its
chat template, and incremental decoding for streaming.

As in the released tokenizer (LlamaTokenizer-style, `legacy=True`): no BOS is added by default; `<unk>` (0) is
also the pad token, `<s>` = 1, `</s>` = 2; `<|begin_of_sentence|>` (cls) opens a chat and `<|end_of_sentence|>`
(sep) closes each assistant turn. Ids of the named tokens are looked up in the model, never assumed.

Tokens such as `<think>` or `<tool_call>` live where real checkpoints keep them: inside `tokenizer.model` (control or
user-defined pieces), or beyond it in `added_tokens.json` ({piece: id}) and tokenizer_config.json's
`added_tokens_decoder` ({"id": {"content": ..., "special": ...}}). As in transformers, their strings in a text become
their ids before the rest is split into pieces, and they decode back to their strings.
Only `sentencepiece` (or `tokenizers` for a `tokenizer.json`) is needed: no paddlenlp, no transformers.
"""

from __future__ import annotations

import os
import re
from typing import Collection, Iterable, NamedTuple, Sequence

from ernie_paddle import files
from ernie_paddle.errors import ErnieError, TokenizerError
from ernie_paddle.text.chat_template import ChatTemplate, read_chat_template
from ernie_paddle.text.special import MASK_TOKENS, SPECIAL
from ernie_paddle.textfile import read_json_object


def has_tokenizer(directory: str) -> bool:
    """Whether the folder holds a tokenizer ErnieTokenizer reads (tokenizer.model or tokenizer.json)."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in (files.SPM_MODEL, files.TOKENIZER_JSON))


class ErnieTokenizer:
    """Encode/decode with a SentencePiece model (preferred) or a `tokenizer.json`, plus the checkpoint's added
    tokens; `chat_template` is the checkpoint's own (read when first used)."""

    def __init__(self, directory: str):
        spm_path = os.path.join(directory, files.SPM_MODEL)
        json_path = os.path.join(directory, files.TOKENIZER_JSON)
        self.directory = directory
        self._sp = self._hf = None
        if os.path.isfile(spm_path):
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(spm_path)
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"{spm_path}: not a SentencePiece model ({e})") from None
            base_size = self._sp.GetPieceSize()
        elif os.path.isfile(json_path):
            from tokenizers import Tokenizer

            try:
                self._hf = Tokenizer.from_file(json_path)
            except Exception as e:  # tokenizers raises plain Exceptions
                raise TokenizerError(f"{json_path}: not a tokenizers file ({e})") from None
            base_size = self._hf.get_vocab_size()
        else:
            raise TokenizerError(f"{directory}: no {files.SPM_MODEL} or {files.TOKENIZER_JSON} (prompts as text need "
                                 f"one; use --input-ids otherwise)")
        self.config = _read_json_object(os.path.join(directory, files.TOKENIZER_CONFIG))
        self.named_tokens = _named_tokens(self.config, _read_json_object(
            os.path.join(directory, files.SPECIAL_TOKENS_MAP)), os.path.join(directory, files.TOKENIZER_CONFIG))
        self._added, special = self._added_tokens()
        self.vocab_size = max([base_size] + [i + 1 for i in self._added.values()])
        self.special_ids = {name: self._id(self.named_tokens.get(f"{name}_token", piece))
                            for name, piece in SPECIAL.items()}
        named = list(self.named_tokens.values()) + list(SPECIAL.values()) + MASK_TOKENS
        self.all_special_ids = {i for i in map(self._id, named) if i is not None} | special
        # strings that become one id before the rest of the text is split into pieces, longest first
        self._pieces = {p: i for p in set(self._added) | set(self.named_tokens.values())
                        if p and (i := self._id(p)) is not None}
        self._texts = {i: p for p, i in self._pieces.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self._pieces, key=len, reverse=True))) + ")") \
            if self._pieces else None
        self._chat_template = None
        self._stop_ids = self._read_stop_ids()

    def _added_tokens(self) -> tuple[dict[str, int], set[int]]:
        """({string: id}, special ids) of the tokens besides the plain pieces: the model's control pieces (and a
        tokenizer.json's added tokens), then added_tokens.json and `added_tokens_decoder`, later ones winning."""
        added: dict[str, int] = {}
        special: set[int] = set()
        if self._sp is not None:  # control pieces (<s>, </s> ...) are never made from text by sentencepiece itself
            for i in range(self._sp.GetPieceSize()):
                if self._sp.IsControl(i):
                    added[self._sp.IdToPiece(i)] = i
                    special.add(i)
        else:
            for i, token in self._hf.get_added_tokens_decoder().items():
                added[token.content] = i
                if token.special:
                    special.add(i)
        for token in read_added_tokens(self.directory, self.config):
            added[token.content] = token.id
            if token.special:
                special.add(token.id)
        extra = _special_names(self.config, os.path.join(self.directory, files.TOKENIZER_CONFIG))
        special |= {added[p] for p in extra if p in added}
        return added, special

    def _id(self, piece: str) -> int | None:
        if piece in self._added:
            return self._added[piece]
        if self._sp is None:
            return self._hf.token_to_id(piece)
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i) else i

    # ---- ids of named tokens ---------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.special_ids["bos"]

    @property
    def eos_token_id(self) -> int | None:
        return self.special_ids["eos"]

    @property
    def pad_token_id(self) -> int | None:
        return self.special_ids["pad"]

    @property
    def cls_token_id(self) -> int | None:
        return self.special_ids["cls"]

    @property
    def sep_token_id(self) -> int | None:
        return self.special_ids["sep"]

    def token_to_id(self, piece: str) -> int | None:
        return self._id(piece)

    # ---- encode / decode ---------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special and added token strings (<|end_of_sentence|>, </think>...) become their ids."""
        ids = [self.bos_token_id] if add_bos else []
        for i, part in enumerate(self._split.split(text) if self._split else [text]):
            if i % 2:  # the separators the split captured
                ids.append(self._pieces[part])
            elif part:
                ids += self._sp.EncodeAsIds(part) if self._sp is not None else self._hf.encode(
                    part, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, keep: Collection[str] = ()) -> str:
        """The text of `ids`; `skip_special_tokens` drops special tokens except those whose strings are in `keep`
        (a chat format's tags, which may be special)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            kept = {self._id(p) for p in keep}
            ids = [i for i in ids if i not in self.all_special_ids or i in kept]
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._texts:
                run.append(i)
                continue
            if run:
                out.append(self._sp.DecodeIds(run) if self._sp is not None else self._hf.decode(
                    run, skip_special_tokens=False))
                run = []
            if i is not None:
                out.append(self._texts[i])
        return "".join(out)

    # ---- chat ------------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's chat template, read when first used: ERNIE-4.5's with a warning when the checkpoint ships
        none."""
        if self._chat_template is None:
            self._chat_template = read_chat_template(self.directory, self.config, self.named_tokens)
        return self._chat_template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: Sequence[dict] | None = None,
                            documents: Sequence[dict] | None = None, **kwargs) -> list[int] | str:
        """`messages` (and `tools`) in the checkpoint's chat template, as ids or (`tokenize=False`) text; extra
        keyword arguments (e.g. enable_thinking) go to the template."""
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         documents=documents, **kwargs)
        return self.encode(text) if tokenize else text

    def vocab_limit(self, embedding_rows: int) -> int | None:
        """Ids from here on are never chosen: embedding rows past the tokenizer's vocabulary are padding (as
        FastDeploy masks them); None when the tokenizer covers every row."""
        return self.vocab_size if self.vocab_size < embedding_rows else None

    def stop_ids(self) -> list[int]:
        """Ids that end a generation: </s>, <|end_of_sentence|>, and generation_config.json's eos_token_id(s)."""
        return list(self._stop_ids)

    def _read_stop_ids(self) -> list[int]:
        """`stop_ids`, read once when the tokenizer is built (the server asks on every request)."""
        path = os.path.join(self.directory, files.GENERATION_CONFIG)
        declared = _read_json_object(path).get("eos_token_id", [])
        declared = [declared] if not isinstance(declared, list) else declared
        ids = [self.eos_token_id, self.sep_token_id] + [_token_id(i, f"{path}: eos_token_id") for i in declared]
        return list(dict.fromkeys(i for i in ids if i is not None))


class ExtraToken(NamedTuple):
    """A token a checkpoint's tokenizer files add to the model's vocabulary, at a fixed id."""
    id: int
    content: str
    special: bool = False


def read_added_tokens(directory: str, config: dict, error: type[ErnieError] = TokenizerError) -> list[ExtraToken]:
    """A checkpoint's added tokens in file order: added_tokens.json's, then `config`'s (tokenizer_config.json's)
    added_tokens_decoder, which alone marks some special; a bad entry raises `error`, naming the file and field."""
    added_path = os.path.join(directory, files.ADDED_TOKENS)
    tokens = [ExtraToken(_token_id(i, f"{added_path}: {content!r}", error), content)
              for content, i in _read_json_object(added_path, error).items()]
    listed = {t.id: t.content for t in tokens}
    path = os.path.join(directory, files.TOKENIZER_CONFIG)
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise error(f"{path}: added_tokens_decoder must be an object of {{id: {{content, special}}}}")
    for key, token in decoder.items():
        where = f"{path}: added_tokens_decoder[{key!r}]"
        if not isinstance(token, dict) or not isinstance(token.get("content"), str):
            raise error(f"{where}: expected an object with a string \"content\"")
        i, content = _token_id(key, where, error), token["content"]
        if listed.get(i, content) != content:
            raise error(f"{where}: {content!r}, but {added_path} gives id {i} to {listed[i]!r}")
        tokens.append(ExtraToken(i, content, bool(token.get("special", False))))
    return tokens


def _read_json_object(path: str, error: type[ErnieError] = TokenizerError) -> dict:
    """A JSON object file of the tokenizer ({} when absent); a corrupt one is named."""
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, error)


def _token_id(value, where: str, error: type[ErnieError] = TokenizerError) -> int:
    """A token id as a checkpoint file gives it (an int, or a digit string as a JSON key)."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{where}: expected a token id (a non-negative integer), got {value!r}")
    return value


def _token_text(value, where: str) -> str:
    """A token as tokenizer_config.json names it: a string, or transformers' AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{where}: expected a token string, got {value!r}")
    return value


def _named_tokens(config: dict, special_tokens_map: dict, path: str) -> dict[str, str]:
    """bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token as the checkpoint declares them
    (tokenizer_config.json, then special_tokens_map.json for the ones it lacks): what chat templates are given."""
    out = {}
    for name in (f"{k}_token" for k in SPECIAL):
        value = config.get(name, special_tokens_map.get(name))
        if value is not None:
            out[name] = _token_text(value, f"{path}: {name}")
    return out


def _special_names(config: dict, path: str) -> list[str]:
    """The strings tokenizer_config.json lists as special besides the named ones (`additional_special_tokens`, or
    transformers 5's `extra_special_tokens`, a list or a {name: token} object)."""
    out = []
    for field in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(field) or []
        for token in (value.values() if isinstance(value, dict) else value):
            out.append(_token_text(token, f"{path}: {field}"))
    return out


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces for streaming, never splitting a UTF-8 character.

    Each step decodes only a short window: the last few tokens already emitted (so word-initial spaces and
    multi-token characters come out right) plus the new ones, and emits the text the new ones add, holding it back
    while it ends in U+FFFD (a byte-fallback character still waiting for its remaining bytes). The cost per token
    does not grow with the text. `keep`: special tokens to keep in the text although skipped otherwise (a chat
    format's tags).
    """

    CONTEXT = 6  # tokens already emitted that each window starts with

    def __init__(self, tokenizer: ErnieTokenizer, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 keep: Collection[str] = ()):
        self.tok, self.skip, self.keep = tokenizer, skip_special_tokens, tuple(keep)
        self.ids: list[int] = [int(i) for i in prefix_ids]
        self.read = len(self.ids)  # tokens whose text has been emitted
        self.start = max(0, self.read - self.CONTEXT)  # the window's first token

    def _text(self, end: int) -> str:
        return self.tok.decode(self.ids[self.start:end], skip_special_tokens=self.skip, keep=self.keep)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._text(len(self.ids))
        if text.endswith("\ufffd"):
            return ""
        before = self._text(self.read)
        new = text[len(before):] if text.startswith(before) else text
        self.read = len(self.ids)
        self.start = max(0, self.read - self.CONTEXT)
        return new

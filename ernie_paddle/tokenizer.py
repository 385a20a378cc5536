"""The ERNIE-4.5 tokenizer: SentencePiece `tokenizer.model` (or `tokenizer.json`), its special tokens and
chat template, and incremental decoding for streaming.

As in the released tokenizer (LlamaTokenizer-style, `legacy=True`): no BOS is added by default; `<unk>` (0) is
also the pad token, `<s>` = 1, `</s>` = 2; `<|begin_of_sentence|>` (cls) opens a chat and `<|end_of_sentence|>`
(sep) closes each assistant turn. Ids of the named tokens are looked up in the model, never assumed.
Only `sentencepiece` (or `tokenizers` for a `tokenizer.json`) is needed: no paddlenlp, no transformers.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from . import files
from .errors import ErnieError, TokenizerError
from .textfile import read_json_object

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<unk>", "cls": "<|begin_of_sentence|>",
           "sep": "<|end_of_sentence|>", "mask": "<mask:1>"}
MASK_TOKENS = [f"<mask:{i}>" for i in range(8)]  # <mask:4>/<mask:5> sys start/end, <mask:6>/<mask:7> header


def chat_prompt(messages: Sequence[dict], add_generation_prompt: bool = True, cls: str = SPECIAL["cls"],
                sep: str = SPECIAL["sep"]) -> str:
    """ERNIE-4.5's chat template: cls, then `system\\n`, `User: ...\\n`, `Assistant: ...` + sep per turn."""
    out = [cls]
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        if role == "system":
            out.append(f"{content}\n")
        elif role == "user":
            out.append(f"User: {content}\n")
        elif role == "assistant":
            out.append(f"Assistant: {content}{sep}")
        else:
            raise ErnieError(f"chat message role must be system, user or assistant, got {role!r}")
    if add_generation_prompt:
        out.append("Assistant: ")
    return "".join(out)


class ErnieTokenizer:
    """Encode/decode with a SentencePiece model (preferred) or a `tokenizer.json`."""

    def __init__(self, directory: str):
        spm_path = os.path.join(directory, files.SPM_MODEL)
        json_path = os.path.join(directory, files.TOKENIZER_JSON)
        self.directory = directory
        if os.path.isfile(spm_path):
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(spm_path)
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"{spm_path}: not a SentencePiece model ({e})") from None
            self._hf = None
            self.vocab_size = self._sp.GetPieceSize()
            self._id = self._sp_id
        elif os.path.isfile(json_path):
            from tokenizers import Tokenizer

            try:
                self._hf = Tokenizer.from_file(json_path)
            except Exception as e:  # tokenizers raises plain Exceptions
                raise TokenizerError(f"{json_path}: not a tokenizers file ({e})") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size()
            self._id = self._hf.token_to_id
        else:
            raise TokenizerError(f"{directory}: no {files.SPM_MODEL} or {files.TOKENIZER_JSON} (prompts as text need "
                                 f"one; use --input-ids otherwise)")
        # nothing in it is used yet (the chat template is ERNIE-4.5's own), but a corrupt file is named now
        _read_json_object(os.path.join(directory, files.TOKENIZER_CONFIG))
        self.special_ids = {name: self._id(piece) for name, piece in SPECIAL.items()}
        self.all_special_ids = {i for i in (self._id(p) for p in list(SPECIAL.values()) + MASK_TOKENS)
                                if i is not None}

    def _sp_id(self, piece: str) -> int | None:
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != SPECIAL["unk"] else i

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
        """Token ids of `text` (special-token strings such as <|end_of_sentence|> become their ids)."""
        ids = list(self._sp.EncodeAsIds(text)) if self._sp is not None else self._hf.encode(
            text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos else []) + ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        if self._sp is not None:
            return self._sp.DecodeIds(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        text = chat_prompt(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def stop_ids(self) -> list[int]:
        """Ids that end a generation: </s> and <|end_of_sentence|>."""
        return [i for i in (self.eos_token_id, self.sep_token_id) if i is not None]


def _read_json_object(path: str) -> dict:
    """A JSON object file of the tokenizer ({} when absent); a corrupt one is named."""
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, TokenizerError)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces for streaming, never splitting a UTF-8 character.

    Decodes prompt + generated ids (so word-initial spaces come out right) and emits what is new, holding the
    text back while it ends in U+FFFD (a byte-fallback character still waiting for its remaining bytes).
    """

    def __init__(self, tokenizer: ErnieTokenizer, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = [int(i) for i in prefix_ids]
        self.emitted = tokenizer.decode(self.ids, skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return new

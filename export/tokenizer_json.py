"""`tokenizer.json` for onnxruntime-genai, built from a checkpoint's SentencePiece `tokenizer.model`.

onnxruntime-genai reads only `tokenizer.json` + `tokenizer_config.json` (Hugging Face's formats); ERNIE-4.5
checkpoints carry a SentencePiece model. `tokenizer_json` rebuilds it with the `tokenizers` library so that it
encodes and decodes as `SentencePieceProcessor` does:

- model: BPE (merges ranked by the score of the piece they make, as SentencePiece merges) or Unigram (the pieces'
  scores), with byte fallback when the proto has it;
- normalizer: the proto's `normalizer_spec` in SentencePiece's order (precompiled character map, extra-whitespace
  removal, spaces to `▁`, the dummy prefix);
- added tokens: control pieces (`<s>`, `</s>`) special, user-defined ones (`<|begin_of_sentence|>`, `\\n`, ...) not,
  so that decoding without special tokens gives SentencePiece's text (control pieces decode to nothing,
  user-defined ones to themselves); tokens beyond the proto (`added_tokens.json`, `added_tokens_decoder`) at their
  ids;
- decoder: the unknown piece's surface (` ⁇ `), `▁` to space, byte fallback, fuse, the dummy prefix stripped.

Exact for models without a dummy prefix or extra-whitespace removal (ERNIE-style, and those
`training.train_tokenizer` makes): in `tokenizers` always, in onnxruntime-genai for BPE models with the identity
normalization. `tokenizers` normalizes each chunk between added tokens alone, so with those SentencePiece options
it differs on text that starts with an added token (SentencePiece puts a lone `▁` before it), on spaces just before
one (SentencePiece keeps one) and, without extra-whitespace removal, on text that starts with a space (one `▁`
fewer). onnxruntime-genai 0.18 reads only the vocabulary, merges and added tokens of a BPE file (no Unigram, no
normalizer; a dummy prefix goes before every chunk between added tokens and stays when decoding), cuts runs of over
100 symbols without a space or newline (long CJK text) before merging, and ends strings at NUL. A control piece's
string (`<s>`) in text encodes to its id, as in every Hugging Face tokenizer; SentencePiece spells it out.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

from ernie_paddle.atomic import atomic_path, write_json
from ernie_paddle.errors import ExportError
from ernie_paddle.files import SPM_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON
from ernie_paddle.text.chat_template import read_chat_template
from ernie_paddle.text.tokenizer import ExtraToken, read_added_tokens
from ernie_paddle.textfile import read_json_object

# The class onnxruntime-genai is told: Hugging Face's generic fast tokenizer (tokenizer.json as written, no class
# defaults), which onnxruntime-extensions reads as a SentencePiece-style BPE from the decoder's `▁` step.
GENAI_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
SPACE = "▁"  # SentencePiece's whitespace

# sentencepiece_model.proto's enums
_UNIGRAM, _BPE = 1, 2
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def read_proto(spm_path: str):
    """The `ModelProto` of a SentencePiece model; an unreadable or corrupt file is one ExportError naming it."""
    import sentencepiece as spm
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    try:
        with open(spm_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExportError(f"{spm_path}: cannot read it ({e})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        spm.SentencePieceProcessor(model_proto=data)  # SentencePiece's own checks, beyond the protobuf parse
        proto.ParseFromString(data)
    except (RuntimeError, DecodeError) as e:
        raise ExportError(f"{spm_path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:  # an empty file parses as an empty proto
        raise ExportError(f"{spm_path}: not a SentencePiece model (no pieces)")
    kind = proto.trainer_spec.model_type
    if kind not in (_UNIGRAM, _BPE):
        raise ExportError(f"{spm_path}: a {_MODEL_TYPES.get(kind, kind)} SentencePiece model; {TOKENIZER_JSON} is "
                          f"written for BPE and Unigram models only")
    if proto.trainer_spec.treat_whitespace_as_suffix or (proto.normalizer_spec.add_dummy_prefix
                                                         and not proto.normalizer_spec.escape_whitespaces):
        raise ExportError(f"{spm_path}: whitespace as a suffix, or a dummy prefix without ▁ for spaces, has no "
                          f"{TOKENIZER_JSON} equivalent")
    return proto


def tokenizer_json(spm_path: str, added_tokens: Sequence[ExtraToken] = ()) -> dict:
    """The `tokenizer.json` (as a dict) that encodes and decodes as the SentencePiece model at `spm_path`, with
    `added_tokens` beyond its vocabulary at their ids."""
    from tokenizers import AddedToken, Tokenizer

    proto = read_proto(spm_path)
    pieces = [p.piece for p in proto.pieces]
    extras = _extras(spm_path, pieces, added_tokens)
    tok = Tokenizer(_model(spm_path, proto, extras))
    tok.normalizer, tok.pre_tokenizer = _normalizer(proto.normalizer_spec), _pre_tokenizer(proto)
    tok.decoder = _decoder(proto)
    # in the model's vocabulary already, so each keeps its id there; matched in the raw text, never normalized
    added = [(i, p.piece, p.type == _CONTROL) for i, p in enumerate(proto.pieces)
             if p.type in (_CONTROL, _USER_DEFINED)]
    added += [(t.id, t.content, t.special) for t in extras]
    tok.add_tokens([AddedToken(content, special=special, normalized=False) for _, content, special in sorted(added)])
    return json.loads(tok.to_str())


def _extras(spm_path: str, pieces: list[str], added_tokens: Sequence[ExtraToken]) -> list[ExtraToken]:
    """The added tokens beyond the proto's vocabulary; one inside it must be the proto's own piece."""
    ids = {p: i for i, p in enumerate(pieces)}
    extras: dict[int, ExtraToken] = {}
    for t in added_tokens:
        if t.id < 0:
            raise ExportError(f"added token {t.content!r}: negative id {t.id}")
        if t.id < len(pieces):
            if pieces[t.id] != t.content:
                raise ExportError(f"added token {t.content!r} has id {t.id}, which is {pieces[t.id]!r} in {spm_path}")
            continue  # the proto's piece and type decide
        if t.content in ids:
            raise ExportError(f"added token {t.content!r} has id {t.id} but is id {ids[t.content]} in {spm_path}")
        if extras.get(t.id, t).content != t.content:
            raise ExportError(f"added tokens {extras[t.id].content!r} and {t.content!r} both have id {t.id}")
        extras[t.id] = t
    return sorted(extras.values())


def _model(spm_path: str, proto, extras: list[ExtraToken]):
    from tokenizers.models import BPE, Unigram

    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == _UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
        for t in extras:  # a Unigram vocabulary is a list: its ids have no gaps
            if t.id != len(vocab):
                raise ExportError(f"added token {t.content!r} has id {t.id}; after the {len(vocab)} pieces of "
                                  f"{spm_path} (Unigram) the next id must be {len(vocab)}")
            vocab.append((t.content, 0.0))
        return Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    vocab.update({t.content: t.id for t in extras})
    # SentencePiece merges the adjacent pair whose union is the best-scoring normal piece (leftmost on ties): rank
    # every split of every normal piece into two normal pieces by the union's score, then its id
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items() for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    return BPE(vocab, [(left, right) for _, left, right in ranked], unk_token=unk, fuse_unk=True,
               byte_fallback=byte_fallback)


def _normalizer(spec):
    """The proto's `normalizer_spec`, in SentencePiece's order.

    `tokenizers` normalizes each chunk between added tokens alone; SentencePiece's whole-text rules map to chunks
    so: leading spaces of a chunk become one `▁` (the dummy prefix, on the first chunk), trailing ones go.
    """
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines and tabs alone
        lead = SPACE if spec.add_dummy_prefix else ""  # Metaspace adds no prefix to a chunk starting with ▁
        steps += [normalizers.Replace(Regex(r" +\z"), ""), normalizers.Replace(Regex(r"\A +"), lead),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces and not spec.add_dummy_prefix:  # else Metaspace does it
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _pre_tokenizer(proto):
    """SentencePiece splits nothing before its BPE or Unigram; only the dummy prefix is added here (before the
    first chunk: Metaspace, `first`). A BPE model without one gets a Split on a character no piece holds: a no-op
    (such a character never merges, or, with byte fallback, neither do its bytes) that onnxruntime-extensions takes
    for "no pre-tokenizer" (chatglm3's `<!dummy-prefix!>`), where it would otherwise split words Llama 3's way."""
    from tokenizers import pre_tokenizers

    if proto.normalizer_spec.add_dummy_prefix:
        return pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)  # also spaces to ▁
    if proto.trainer_spec.model_type != _BPE or not proto.trainer_spec.byte_fallback:
        return None  # without byte fallback the character would be an unknown piece that no longer fuses
    used = {c for p in proto.pieces for c in p.piece}
    marker = next(chr(c) for c in range(0xE000, 0x10FFFF) if chr(c) not in used)  # private use first
    return pre_tokenizers.Split(marker, "isolated")


def _decoder(proto):
    from tokenizers import decoders

    spec = proto.trainer_spec
    # SentencePiece writes the unknown piece as its surface (" ⁇ "), not as "<unk>"
    steps = [decoders.Replace(proto.pieces[spec.unk_id].piece, spec.unk_surface), decoders.Replace(SPACE, " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:  # after Fuse, so that only the text's first space goes
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


# ---- a checkpoint's files -----------------------------------------------------------------------------------------
def genai_tokenizer_config(config: dict) -> dict:
    """The exported folder's tokenizer_config.json: the checkpoint's, with a class onnxruntime-genai accepts (the
    original kept in `original_tokenizer_class`) and no BOS or EOS added, as ERNIE-4.5's tokenizer does."""
    out = dict(config)
    original = config.get("tokenizer_class")
    if original and original != GENAI_TOKENIZER_CLASS:
        out["original_tokenizer_class"] = original
    out["tokenizer_class"] = GENAI_TOKENIZER_CLASS
    # onnxruntime-extensions adds BOS to SentencePiece-style models unless told not to
    out["add_bos_token"] = out["add_eos_token"] = False
    return out


def write_tokenizer_files(model_dir: str, out_dir: str) -> list[str]:
    """Write `tokenizer.json` and the adjusted `tokenizer_config.json` (with the chat template) into `out_dir`; the
    paths written.

    A checkpoint's own tokenizer.json is copied unchanged; otherwise one is built from its tokenizer.model. Nothing
    is written for a checkpoint with neither.
    """
    own = os.path.join(model_dir, TOKENIZER_JSON)
    spm_path = os.path.join(model_dir, SPM_MODEL)
    if not (os.path.isfile(own) or os.path.isfile(spm_path)):
        return []
    config = _read_config(model_dir)
    json_out = os.path.join(out_dir, TOKENIZER_JSON)
    if os.path.isfile(own):
        if os.path.abspath(own) != os.path.abspath(json_out):
            with atomic_path(json_out) as tmp:
                shutil.copyfile(own, tmp)
    else:
        by_id = {t.id: t for t in read_added_tokens(model_dir, config, ExportError)}  # one token per id, the last
        content = tokenizer_json(spm_path, sorted(by_id.values()))
        with atomic_path(json_out) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(content, f, ensure_ascii=False)
    config_out = os.path.join(out_dir, TOKENIZER_CONFIG)
    config["chat_template"] = _chat_template(model_dir, config)
    write_json(config_out, genai_tokenizer_config(config))
    return [json_out, config_out]


def _chat_template(model_dir: str, config: dict) -> str | list[dict]:
    """The template onnxruntime-genai reads from tokenizer_config.json: the checkpoint's (chat_template.jinja wins,
    as in transformers), or ERNIE-4.5's with the warning that says so, so that the folder always has one."""
    templates = read_chat_template(model_dir, config, {}).templates
    if list(templates) == ["default"]:
        return templates["default"]
    return [{"name": k, "template": v} for k, v in templates.items()]


def _read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, TOKENIZER_CONFIG)
    return read_json_object(path, ExportError) if os.path.isfile(path) else {}

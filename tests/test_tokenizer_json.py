"""tokenizer.json built from a SentencePiece tokenizer.model: the same ids and the same text as sentencepiece, in
Hugging Face `tokenizers` and in onnxruntime-genai; the exported folder's tokenizer_config.json; added tokens."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from ernie_paddle.atomic import write_json
from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.corpus import read_corpus, split_corpus
from ernie_paddle.errors import ConfigDefaultWarning, ExportError, TokenizerError
from ernie_paddle.export.genai import genai_config
from ernie_paddle.export.tokenizer_json import (GENAI_TOKENIZER_CLASS, genai_tokenizer_config, tokenizer_json,
                                                write_tokenizer_files)
from ernie_paddle.files import (ADDED_TOKENS, CHAT_TEMPLATE, GENAI_CONFIG, ONNX_MODEL, SPM_MODEL, TOKENIZER_CONFIG,
                                TOKENIZER_JSON)
from ernie_paddle.text.chat_template import ERNIE_TEMPLATE
from ernie_paddle.text.special import SPECIAL
from ernie_paddle.text.tokenizer import ErnieTokenizer, ExtraToken

from conftest import tiny_config

TRAIN, HELD_OUT = split_corpus(read_corpus())
LINES = HELD_OUT.splitlines(keepends=True)[:400]
BLOCK = "".join(LINES)
# accents, CJK, emoji: some in the trained tokenizer's vocabulary, the rest (and all of them for the shipped one)
# through byte fallback
WIDE = ["Café au lait, naïve façade — déjà vu; 東京 and ☃ snowmen 🎭.\n", "龘 靐 𠜎 🦜🧬 ½ ﬁ Ａ", "naïve\tfaçade\r\n",
        "  two  spaces, trailing  ", " ", "", "\n\n", "12345 and 3.14159", "ZzQqXx ~`|\\ {}[] <> \x00\x7f"]
CHAT = ["<|begin_of_sentence|>User: hi\n<|end_of_sentence|>",
        "<|begin_of_sentence|>Be brief.\nUser: Who art thou?\nAssistant: A player.<|end_of_sentence|>Assistant: ",
        "<mask:0>a<mask:7>b <|end_of_sentence|><|end_of_sentence|>\n"]
TEXTS = LINES + [BLOCK] + WIDE + CHAT


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A tokenizer as `train_tokenizer` makes them, trained on text with accents, CJK and emoji."""
    d = str(tmp_path_factory.mktemp("trained"))
    from ernie_paddle.paddle.training import train_tokenizer

    train_tokenizer(TRAIN[:150_000] + WIDE[0] * 40, d, vocab_size=800)
    return d


@pytest.fixture(scope="module", params=["shipped", "trained"])
def model_dir(request) -> str:
    return default_model_dir() if request.param == "shipped" else request.getfixturevalue("trained")


def _sp(directory: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(directory, SPM_MODEL))


def _tokenizer(spm_path: str, added=()) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tokenizer_json(spm_path, added)))


def _encoder(tok: Tokenizer):
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _mismatches(sp: spm.SentencePieceProcessor, encode, decode, texts) -> list:
    """(text, sentencepiece's ids, ours) and (ids, sentencepiece's text, ours) wherever they differ."""
    bad = []
    for text in texts:
        want, got = sp.encode(text), list(encode(text))
        if got != want:
            bad.append((text[:60], want[:20], got[:20]))
        if decode(want) != sp.decode(want):
            bad.append((want[:20], sp.decode(want)[:60], decode(want)[:60]))
    return bad


def test_same_ids_and_text_as_sentencepiece(model_dir):
    sp = _sp(model_dir)
    tok = _tokenizer(os.path.join(model_dir, SPM_MODEL))
    assert _mismatches(sp, _encoder(tok), tok.decode, TEXTS) == []
    assert tok.get_vocab_size() == sp.get_piece_size()


def test_special_token_strings_encode_to_their_ids(model_dir):
    sp = _sp(model_dir)
    tok = _tokenizer(os.path.join(model_dir, SPM_MODEL))
    cls, sep = sp.piece_to_id(SPECIAL["cls"]), sp.piece_to_id(SPECIAL["sep"])
    ids = tok.encode(CHAT[0], add_special_tokens=False).ids
    assert ids == sp.encode(CHAT[0]) and ids[0] == cls and ids[-1] == sep and sp.piece_to_id("\n") in ids
    assert tok.decode(ids) == CHAT[0]


def test_control_pieces_are_special_tokens():
    """`<s>`/`</s>` in text become their ids (as in Hugging Face's tokenizers; sentencepiece spells them out), and
    decode to nothing, as in sentencepiece."""
    sp = _sp(default_model_dir())
    tok = _tokenizer(os.path.join(default_model_dir(), SPM_MODEL))
    ids = tok.encode("<s>Speak.</s>", add_special_tokens=False).ids
    assert ids == [sp.bos_id(), *sp.encode("Speak."), sp.eos_id()]
    assert tok.decode(ids) == sp.decode(ids) == "Speak."


def test_unigram_and_normalizer_spec(tmp_path):
    """A Unigram model with NFKC, a dummy prefix and extra-whitespace removal (sentencepiece's defaults), and one
    without byte fallback (unknown pieces decode as sentencepiece writes them)."""
    (tmp_path / "train.txt").write_text(TRAIN[:100_000] + WIDE[0] * 20, encoding="utf-8")
    variants = {"nfkc": {}, "no_fallback": {"byte_fallback": False, "character_coverage": 0.99}}
    for name, changes in variants.items():
        options = {"byte_fallback": True, "character_coverage": 1.0, **changes}
        spm.SentencePieceTrainer.Train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / name),
                                       model_type="unigram", vocab_size=600, num_threads=1, minloglevel=2, **options)
        path = str(tmp_path / f"{name}.model")
        sp, tok = spm.SentencePieceProcessor(model_file=path), _tokenizer(path)
        texts = LINES + [BLOCK] + WIDE + [" x", "a  \t b  ", "ＡＢＣ ﬁ ①"]
        assert _mismatches(sp, _encoder(tok), tok.decode, texts) == []


# ---- a checkpoint's files -------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path) -> str:
    """The shipped tokenizer with added tokens in both places real checkpoints list them, and a chat template."""
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(os.path.join(default_model_dir(), SPM_MODEL), d / SPM_MODEL)
    n = _sp(str(d)).get_piece_size()
    write_json(str(d / ADDED_TOKENS), {"<think>": n, "</think>": n + 1})
    with open(os.path.join(default_model_dir(), TOKENIZER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config["added_tokens_decoder"] = {
        "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
        str(n + 1): {"content": "</think>", "special": False},
        str(n + 4): {"content": "<tool_call>", "lstrip": False, "normalized": False, "special": True}}
    write_json(str(d / TOKENIZER_CONFIG), config)
    return str(d)


def test_added_tokens_get_their_ids(ckpt, tmp_path):
    n = _sp(ckpt).get_piece_size()
    out = str(tmp_path / "out")
    assert write_tokenizer_files(ckpt, out) == [os.path.join(out, TOKENIZER_JSON), os.path.join(out, TOKENIZER_CONFIG)]
    tok = Tokenizer.from_file(os.path.join(out, TOKENIZER_JSON))
    text = "<think>Speak.</think>\n<tool_call>x"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert [i for i in ids if i >= n] == [n, n + 1, n + 4]
    assert tok.decode(ids) == "<think>Speak.</think>\nx"  # <tool_call> is special, the others are not
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_config_for_genai(ckpt, tmp_path):
    out = str(tmp_path / "out")
    write_tokenizer_files(ckpt, out)
    with open(os.path.join(ckpt, TOKENIZER_CONFIG), encoding="utf-8") as f:
        original = json.load(f)
    with open(os.path.join(out, TOKENIZER_CONFIG), encoding="utf-8") as f:
        written = json.load(f)
    assert written["tokenizer_class"] == GENAI_TOKENIZER_CLASS
    assert written["original_tokenizer_class"] == original["tokenizer_class"] == "Ernie4_5Tokenizer"
    assert written["add_bos_token"] is False and written["add_eos_token"] is False
    kept = {k: v for k, v in written.items() if k not in ("tokenizer_class", "original_tokenizer_class")}
    assert kept == {k: v for k, v in original.items() if k != "tokenizer_class"}
    assert genai_tokenizer_config({"add_bos_token": True})["add_bos_token"] is False
    assert "original_tokenizer_class" not in genai_tokenizer_config({"tokenizer_class": GENAI_TOKENIZER_CLASS})


def test_own_tokenizer_json_copied_unchanged(tmp_path):
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    content = tokenizer_json(os.path.join(default_model_dir(), SPM_MODEL))
    content["normalizer"] = None  # anything: it is the checkpoint's
    (src / TOKENIZER_JSON).write_text(json.dumps(content), encoding="utf-8")
    with pytest.warns(ConfigDefaultWarning, match="no chat template .* using the built-in ERNIE-4.5 chat template$"):
        written = write_tokenizer_files(str(src), out)
    assert (tmp_path / "out" / TOKENIZER_JSON).read_bytes() == (src / TOKENIZER_JSON).read_bytes()
    with open(written[1], encoding="utf-8") as f:  # genai reads the template from here: the built-in one, said so
        assert json.load(f) == {"tokenizer_class": GENAI_TOKENIZER_CLASS, "add_bos_token": False,
                                "add_eos_token": False, "chat_template": ERNIE_TEMPLATE}


def test_chat_template_jinja_goes_into_the_exported_config(tmp_path):
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    shutil.copy(os.path.join(default_model_dir(), SPM_MODEL), src / SPM_MODEL)
    (src / TOKENIZER_CONFIG).write_text(json.dumps({"chat_template": "from the config"}), encoding="utf-8")
    (src / CHAT_TEMPLATE).write_text("{{ messages[0]['content'] }}", encoding="utf-8")  # wins, as in transformers
    written = write_tokenizer_files(str(src), out)
    with open(written[1], encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == "{{ messages[0]['content'] }}"


def test_no_tokenizer_writes_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    assert write_tokenizer_files(str(tmp_path / "src"), str(tmp_path / "out")) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", [b"", b"not a model\n", "half"])
def test_corrupt_model_is_one_error_naming_it(tmp_path, data):
    if data == "half":
        with open(os.path.join(default_model_dir(), SPM_MODEL), "rb") as f:
            whole = f.read()
        data = whole[:len(whole) // 2]
    (tmp_path / SPM_MODEL).write_bytes(data)
    with pytest.raises(ExportError, match=str(tmp_path / SPM_MODEL)):
        write_tokenizer_files(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out" / TOKENIZER_JSON).exists()


def test_char_model_refused(tmp_path):
    (tmp_path / "train.txt").write_text(TRAIN[:20_000], encoding="utf-8")
    spm.SentencePieceTrainer.Train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   model_type="char", num_threads=1, minloglevel=2)
    with pytest.raises(ExportError, match=r"tokenizer\.model: a CHAR SentencePiece model"):
        tokenizer_json(str(tmp_path / SPM_MODEL))


@pytest.mark.parametrize("added, message", [
    ([ExtraToken(3, "<think>")], "has id 3, which is '<|begin_of_sentence|>'"),
    ([ExtraToken(5000, "<s>")], "has id 5000 but is id 1"),
    ([ExtraToken(5000, "<a>"), ExtraToken(5000, "<b>")], "both have id 5000")])
def test_conflicting_added_tokens(added, message):
    with pytest.raises(ExportError, match=message):
        tokenizer_json(os.path.join(default_model_dir(), SPM_MODEL), added)


def test_added_token_files_that_disagree(ckpt):
    write_json(os.path.join(ckpt, ADDED_TOKENS), {"<think>": 5000, "<other>": 5001})
    with open(os.path.join(ckpt, TOKENIZER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    config["added_tokens_decoder"] = {"5001": {"content": "</think>"}}
    write_json(os.path.join(ckpt, TOKENIZER_CONFIG), config)
    message = (f"{os.path.join(ckpt, TOKENIZER_CONFIG)}: added_tokens_decoder['5001']: '</think>', but "
               f"{os.path.join(ckpt, ADDED_TOKENS)} gives id 5001 to '<other>'")
    with pytest.raises(ExportError, match=f"^{re.escape(message)}$"):
        write_tokenizer_files(ckpt, ckpt)
    with pytest.raises(TokenizerError, match=f"^{re.escape(message)}$"):  # one reader: the tokenizer refuses it too
        ErnieTokenizer(ckpt)


@pytest.mark.parametrize("added, decoder, message", [
    ({"<think>": -1}, {}, "{added}: '<think>': expected a token id (a non-negative integer), got -1"),
    ({"<think>": True}, {}, "{added}: '<think>': expected a token id (a non-negative integer), got True"),
    ({}, {"x": {"content": "<think>"}},
     "{config}: added_tokens_decoder['x']: expected a token id (a non-negative integer), got 'x'"),
    ({}, {"5000": {"special": True}},
     "{config}: added_tokens_decoder['5000']: expected an object with a string \"content\""),
    ({}, [], "{config}: added_tokens_decoder must be an object of {{id: {{content, special}}}}")])
def test_bad_added_tokens_are_named_as_the_tokenizer_names_them(ckpt, added, decoder, message):
    write_json(os.path.join(ckpt, ADDED_TOKENS), added)
    with open(os.path.join(ckpt, TOKENIZER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    config["added_tokens_decoder"] = decoder
    write_json(os.path.join(ckpt, TOKENIZER_CONFIG), config)
    message = message.format(added=os.path.join(ckpt, ADDED_TOKENS), config=os.path.join(ckpt, TOKENIZER_CONFIG))
    with pytest.raises(ExportError, match=f"^{re.escape(message)}$"):
        write_tokenizer_files(ckpt, os.path.join(ckpt, "out"))
    with pytest.raises(TokenizerError, match=f"^{re.escape(message)}$"):
        ErnieTokenizer(ckpt)


# ---- onnxruntime-genai ----------------------------------------------------------------------------------------------
def _genai_tokenizer(model_dir: str, folder: str):
    """onnxruntime-genai's tokenizer of an exported folder holding the written files; og.Config reads the folder's
    genai_config.json and loads no model."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra) not installed")
    write_tokenizer_files(model_dir, folder)
    write_json(os.path.join(folder, GENAI_CONFIG), genai_config(tiny_config(vocab_size=4096), ONNX_MODEL, True))
    return og.Tokenizer(og.Config(folder))


def test_genai_same_ids_and_text_as_sentencepiece(model_dir, tmp_path):
    sp, tok = _sp(model_dir), _genai_tokenizer(model_dir, str(tmp_path))
    texts = [t for t in TEXTS if "\x00" not in t]  # its C API ends a string at NUL, in and out
    assert _mismatches(sp, tok.encode, tok.decode, texts) == []
    ids = tok.encode(CHAT[0]).tolist()
    assert ids[0] == sp.piece_to_id(SPECIAL["cls"]) and ids[-1] == sp.piece_to_id(SPECIAL["sep"])
    framed = [sp.bos_id(), *ids, sp.eos_id()]  # control pieces: skipped by genai, nothing in sentencepiece
    assert tok.decode(framed) == sp.decode(framed) == CHAT[0]


def test_genai_added_tokens(ckpt, tmp_path):
    n = _sp(ckpt).get_piece_size()
    tok = _genai_tokenizer(ckpt, str(tmp_path / "out"))
    ids = tok.encode("<think>Speak.</think>\n<tool_call>x").tolist()
    assert [i for i in ids if i >= n] == [n, n + 1, n + 4]
    assert tok.decode(ids) == "<think>Speak.</think>\nx"

"""The ERNIE tokenizer on SentencePiece models the tests train themselves, its chat template, streaming."""

from __future__ import annotations

import json
import os

import pytest

from ernie_paddle.errors import InputError, TokenizerError
from ernie_paddle.tokenizer import ErnieTokenizer, IncrementalDecoder, chat_prompt
from ernie_paddle.corpus import split_corpus
from ernie_paddle.training import train_tokenizer

from conftest import run_cli

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          "Café au lait, naïve façade — déjà vu; 東京 and ☃ snowmen.\n") * 200


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, str(d), vocab_size=400)
    return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return ErnieTokenizer(tok_dir)


def test_special_tokens_and_no_bos_by_default(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.token_to_id("<unk>") == 0
    assert tok.cls_token_id is not None and tok.sep_token_id is not None and tok.cls_token_id != tok.sep_token_id
    assert tok.token_to_id("<mask:1>") is not None and tok.token_to_id("<mask:7>") is not None
    ids = tok.encode("Speak, speak.")
    assert ids[0] != tok.bos_token_id
    assert tok.encode("Speak, speak.", add_bos=True) == [tok.bos_token_id] + ids
    assert tok.stop_ids() == [tok.eos_token_id, tok.sep_token_id]


@pytest.mark.parametrize("text", ["First Citizen:\nBefore we proceed.\n\nAll:", "  two  spaces\tand a tab",
                                  "naïve façade — déjà vu 東京 ☃ 🎭", "ZzQqXx 12345"])
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_encode_to_their_ids(tok):
    ids = tok.encode("<|begin_of_sentence|>User: hi\n")
    assert ids[0] == tok.cls_token_id
    assert tok.decode(ids) == "<|begin_of_sentence|>User: hi\n"
    assert tok.decode(ids, skip_special_tokens=True) == "User: hi\n"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Speak."}]
    text = chat_prompt(messages)
    assert text == ("<|begin_of_sentence|>Be brief.\nUser: Who art thou?\nAssistant: A player.<|end_of_sentence|>"
                    "User: Speak.\nAssistant: ")
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(text) and ids.count(tok.sep_token_id) == 1 and ids[0] == tok.cls_token_id
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False).endswith("thou?\n")
    with pytest.raises(Exception, match="role must be system, user or assistant, got 'tool'"):
        chat_prompt([{"role": "tool", "content": "x"}])


def test_incremental_decoding_never_splits_characters(tok):
    prompt = tok.encode("Speak")
    text = " naïve 東京 ☃ 🎭 snowmen."
    ids = tok.encode("Speak" + text)[len(prompt):]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some pieces are lone bytes
    dec = IncrementalDecoder(tok, prompt)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_tokenizer_json_is_read_when_there_is_no_spm(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|begin_of_sentence|>": 3, "<|end_of_sentence|>": 4, "hello": 5,
             "world": 6}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = ErnieTokenizer(str(tmp_path))
    assert tok.encode("hello world") == [5, 6] and tok.sep_token_id == 4 and tok.vocab_size == 7


def test_missing_or_corrupt_tokenizer_is_named(tmp_path, tiny_ckpt):
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        ErnieTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a SentencePiece model"):
        ErnieTokenizer(str(tmp_path))
    r = run_cli("generate", "--model", tiny_ckpt[0], "--prompt", "hello")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no tokenizer.model or tokenizer.json" in r.stderr


def test_split_corpus_holds_out_the_last_tenth_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, held = split_corpus(text)
    assert train + held == text and train.endswith("\n")
    assert abs(len(held.encode()) - 0.1 * len(text.encode())) < 12


def test_a_vocabulary_too_small_for_the_corpus_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="--vocab-size 40: sentencepiece cannot train this tokenizer .*smaller"):
        train_tokenizer(CORPUS, str(tmp_path), vocab_size=40)
    assert os.listdir(tmp_path) == []

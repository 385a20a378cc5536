"""The ERNIE tokenizer on SentencePiece models the tests train themselves: special and added tokens wherever a
checkpoint keeps them, the chat template, streaming."""

from __future__ import annotations

import json
import os

import pytest

from ernie_paddle.errors import InputError, TokenizerError
from ernie_paddle.text.tokenizer import ErnieTokenizer, IncrementalDecoder
from ernie_paddle.corpus import split_corpus
from ernie_paddle.paddle.training import train_tokenizer

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
    with pytest.warns(UserWarning, match="no chat template in tokenizer_config.json or chat_template.jinja; using "
                                         "the built-in ERNIE-4.5 chat template"):
        text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|begin_of_sentence|>Be brief.\nUser: Who art thou?\nAssistant: A player.<|end_of_sentence|>"
                    "User: Speak.\nAssistant: ")
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(text) and ids.count(tok.sep_token_id) == 1 and ids[0] == tok.cls_token_id
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=False, tokenize=False).endswith("thou?\n")
    with pytest.raises(TokenizerError, match="^the built-in ERNIE-4.5 chat template: chat message role must be "
                                             "system, user or assistant, got 'tool'$"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


# ---- special tokens inside tokenizer.model, or beyond it in added_tokens.json / added_tokens_decoder ---------------
TAGS = ["<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>"]


def test_the_models_own_control_and_user_defined_pieces(tok):
    """train_tokenizer keeps <s> and </s> as control pieces (sentencepiece alone neither makes them from text nor
    prints them) and ERNIE's named tokens as user-defined ones: all become their ids and decode back."""
    text = "<s>Speak<|end_of_sentence|></s><mask:4>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-3:] == [tok.eos_token_id, tok.token_to_id("<mask:4>"),
                                                        tok.token_to_id("\n")]
    assert tok.sep_token_id in ids and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Speak\n"


@pytest.fixture(scope="module", params=["added_tokens.json", "added_tokens_decoder"])
def tagged(request, tok_dir, tmp_path_factory):
    """The test tokenizer with the -Thinking tags beyond its 400 pieces, in one of the two places checkpoints keep
    them; <think> and </think> are special, the others not."""
    d = tmp_path_factory.mktemp("tagged")
    for f in os.listdir(tok_dir):
        (d / f).write_bytes(open(os.path.join(tok_dir, f), "rb").read())
    config = json.loads((d / "tokenizer_config.json").read_text())
    if request.param == "added_tokens.json":
        (d / "added_tokens.json").write_text(json.dumps({t: 400 + i for i, t in enumerate(TAGS)}))
        config["additional_special_tokens"] = TAGS[:2]
    else:
        config["added_tokens_decoder"] = {str(400 + i): {"content": t, "special": i < 2} for i, t in enumerate(TAGS)}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return ErnieTokenizer(str(d))


def test_added_tokens_encode_to_their_ids_and_decode_back(tagged):
    assert [tagged.token_to_id(t) for t in TAGS] == list(range(400, 406)) and tagged.vocab_size == 406
    text = "Speak</think>\n\n<response>\nAll: speak.\n</response><tool_call>{}</tool_call>"
    ids = tagged.encode(text)
    assert {401, 402, 403, 404, 405} <= set(ids) and tagged.decode(ids) == text
    assert tagged.encode("<think><think>") == [400, 400]
    assert tagged.decode(ids, skip_special_tokens=True) == text.replace("</think>", "")
    assert tagged.decode(ids, skip_special_tokens=True, keep=["</think>"]) == text
    dec = IncrementalDecoder(tagged, tagged.encode("All:<think>"), keep=["</think>"])
    assert "".join(dec.push(i) for i in ids) == text


def test_stop_ids_include_generation_configs_eos_ids(tagged, tmp_path):
    assert tagged.stop_ids() == [tagged.eos_token_id, tagged.sep_token_id]
    for f in os.listdir(tagged.directory):
        (tmp_path / f).write_bytes(open(os.path.join(tagged.directory, f), "rb").read())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 405]}))
    built = ErnieTokenizer(str(tmp_path))
    assert built.stop_ids() == [tagged.eos_token_id, tagged.sep_token_id, 405]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    built.stop_ids().append(7)
    assert built.stop_ids() == [tagged.eos_token_id, tagged.sep_token_id, 405]  # read once, when built
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id: expected a token id \\(a "
                                             "non-negative integer\\), got 'x'"):
        ErnieTokenizer(str(tmp_path))


def test_bad_added_tokens_are_named(tok_dir, tmp_path):
    for f in os.listdir(tok_dir):
        (tmp_path / f).write_bytes(open(os.path.join(tok_dir, f), "rb").read())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<think>": -1}))
    with pytest.raises(TokenizerError, match="added_tokens.json: '<think>': expected a token id \\(a non-negative "
                                             "integer\\), got -1$"):
        ErnieTokenizer(str(tmp_path))
    os.remove(tmp_path / "added_tokens.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"7": {"special": True}}}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: added_tokens_decoder\\['7'\\]: expected an "
                                             "object with a string \"content\"$"):
        ErnieTokenizer(str(tmp_path))


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


def test_incremental_decoding_of_a_long_text_equals_the_whole_decode():
    """Windowed decoding (a few emitted tokens of context per step) gives exactly the whole text's decode, spaces,
    newlines and byte-fallback characters included, on the shipped tokenizer and held-out text."""
    from ernie_paddle.cli.args import default_model_dir
    from ernie_paddle.corpus import held_out_text

    shipped = ErnieTokenizer(default_model_dir())
    text = held_out_text()[:6000] + " naïve 東京 ☃ 🎭\n\n  spaced  out"
    ids = shipped.encode(text)
    prompt, rest = ids[:40], ids[40:]
    dec = IncrementalDecoder(shipped, prompt)
    assert "".join(dec.push(i) for i in rest) == shipped.decode(ids)[len(shipped.decode(prompt)):]

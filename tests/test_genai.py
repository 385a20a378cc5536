"""onnxruntime-genai runs exported folders as written: text, chat and padded batches give the same ids and text as
`ernie-onnx` (the project's runtime), on the shipped model exported in fp32 and int4."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.export import pipeline
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.text.tokenizer import ErnieTokenizer

from conftest import run_cli_onnx

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the test extra) did not install here")

NEW = 24


@pytest.fixture(scope="module", params=["fp32", "int4"])
def folder(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("genai") / request.param)
    pipeline.export(default_model_dir(), out, precision=request.param, verify=False)
    return out


@pytest.fixture(scope="module")
def genai(folder):
    model = og.Model(folder)
    return model, og.Tokenizer(model)


def genai_generate(model, rows: list[list[int]], pad: int, stops: set[int], max_new: int) -> list[list[int]]:
    """genai's greedy loop on a right-padded batch (its own convention); each row's new tokens up to its stop."""
    longest = max(map(len, rows))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=longest + max_new, do_sample=False, batch_size=len(rows))
    gen = og.Generator(model, params)
    ids = np.full((len(rows), longest), pad, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    gen.append_tokens(ids)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    while not gen.is_done():
        gen.generate_next_token()
        for i, t in enumerate(gen.get_next_tokens()):
            if not done[i]:
                out[i].append(int(t))
                done[i] = int(t) in stops
    return out


def test_genai_config_as_written(folder):
    config = json.load(open(f"{folder}/genai_config.json"))
    tok = ErnieTokenizer(folder)
    assert config["model"]["eos_token_id"] == sorted(tok.stop_ids()) == [2, tok.sep_token_id]
    assert config["search"]["past_present_share_buffer"] is True


def test_text_prompt_same_ids_and_text(folder, genai):
    model, gtok = genai
    tok = ErnieTokenizer(folder)
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    ids = tok.encode(text)
    assert list(gtok.encode(text)) == ids
    stops = set(tok.stop_ids())
    theirs = genai_generate(model, [ids], tok.pad_token_id, stops, NEW)[0]
    ours = generate(OnnxCausalLM(folder), ids, GenerationConfig(max_new_tokens=NEW, eos_token_ids=sorted(stops)))
    assert theirs == ours
    assert gtok.decode(np.array(theirs, np.int32)) == tok.decode(ours, skip_special_tokens=True)
    # the CLI users run gives the same
    r = run_cli_onnx("generate", "--model", folder, "--prompt", text, "--max-new-tokens", str(NEW), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == theirs


def test_chat_same_template_ids_and_text(folder, genai):
    model, gtok = genai
    tok = ErnieTokenizer(folder)
    messages = [{"role": "system", "content": "Answer as a player."},
                {"role": "user", "content": "What news from Padua?"}]
    rendered = gtok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert list(gtok.encode(rendered)) == ids
    stops = set(tok.stop_ids())
    theirs = genai_generate(model, [ids], tok.pad_token_id, stops, NEW)[0]
    assert theirs == generate(OnnxCausalLM(folder), ids, GenerationConfig(max_new_tokens=NEW,
                                                                          eos_token_ids=sorted(stops)))
    assert gtok.decode(np.array(theirs, np.int32)) == tok.decode(theirs, skip_special_tokens=True)


def test_batch_of_two_lengths_same_as_each_alone(folder, genai):
    model, _ = genai
    tok = ErnieTokenizer(folder)
    rows = [tok.encode("KING RICHARD:"), tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")]
    assert len(rows[0]) < len(rows[1])
    stops = set(tok.stop_ids())
    gen = GenerationConfig(max_new_tokens=NEW, eos_token_ids=sorted(stops))
    runtime = OnnxCausalLM(folder)
    ours = generate(runtime, rows, gen)
    assert ours == [generate(runtime, r, gen) for r in rows]
    assert genai_generate(model, rows, tok.pad_token_id, stops, NEW) == ours

"""The shipped trained model: what it is, that its report is true, and the main job on Paddle and ONNX Runtime."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from ernie_paddle.text.chat_template import ERNIE_TEMPLATE
from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.config import ErnieConfig
from ernie_paddle.export import pipeline
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.text.tokenizer import ErnieTokenizer
from ernie_paddle.corpus import held_out_text
from ernie_paddle.paddle.training import evaluate

from conftest import run_cli, run_cli_onnx

MODEL = default_model_dir()


@pytest.fixture(scope="module")
def report():
    return json.load(open(os.path.join(MODEL, "training_report.json")))


@pytest.fixture(scope="module")
def model():
    return Ernie4_5_MoeForCausalLM.from_pretrained(MODEL)


def test_shipped_model_has_the_full_architecture(model):
    files = sorted(os.listdir(MODEL))
    assert files == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                     "training_report.json"]
    assert sum(os.path.getsize(os.path.join(MODEL, f)) for f in files) < 40 * 2**20
    # ERNIE-4.5's chat template travels in tokenizer_config.json, as the released -PT checkpoints carry theirs
    assert json.load(open(os.path.join(MODEL, "tokenizer_config.json")))["chat_template"] == ERNIE_TEMPLATE
    cfg = ErnieConfig.from_file(MODEL, strict=True)
    assert cfg.is_moe_model and not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, 4))
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 2 and cfg.moe_num_shared_experts == 2
    bias = model.layers[1].mlp.e_score_correction_bias.numpy()
    assert np.abs(bias).max() > 1e-3  # the aux-free balancing bias was trained


def test_report_perplexity_and_balance_are_reproduced(model, report):
    tok = ErnieTokenizer(MODEL)
    heldout = held_out_text()
    ppl, loads = evaluate(model, np.array(tok.encode(heldout), np.int64), report["seq"])
    assert ppl == pytest.approx(report["heldout_perplexity"], rel=1e-3)
    assert ppl < 60  # far below the 2048-way uniform guess: the model learned the corpus
    assert np.abs(np.array(loads) - np.array(report["expert_load_share"])).max() <= 2e-4
    for share in loads:  # balanced: no expert starved, none takes more than twice its share
        assert min(share) > 0.25 / len(share) and max(share) < 2.0 / len(share)


def test_generate_prompt_streams_text_with_a_summary_line():
    r = run_cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:") + 10
    tok = ErnieTokenizer(MODEL)
    m = re.search(r"\[prompt (\d+) tokens, generated (\d+) tokens, [\d.]+ tokens/s", r.stderr)
    assert m and int(m.group(1)) == len(tok.encode("ROMEO:")) and 1 <= int(m.group(2)) <= 24
    r = run_cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--json")
    out = json.loads(r.stdout)
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
    assert out["prompt_tokens"] == len(tok.encode("ROMEO:"))
    r = run_cli("generate", "--chat", "--prompt", "Who art thou?", "--max-new-tokens", "16", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["prompt_tokens"] == len(
        tok.apply_chat_template([{"role": "user", "content": "Who art thou?"}]))
    assert "warning" not in r.stderr  # the model carries its chat template
    assert (out["reasoning"], out["content"], out["tool_calls"]) == (None, out["text"], [])  # it cannot think
    r = run_cli("generate", "--input-ids", "5,6,7", "--max-new-tokens", "4", "--json")  # the old contract
    assert r.returncode == 0 and len(json.loads(r.stdout)["token_ids"]) == 4


def test_onnx_runtime_greedy_text_equals_paddle(model, tmp_path):
    folder = str(tmp_path / "onnx")
    pipeline.export(MODEL, folder)
    assert os.path.isfile(os.path.join(folder, "tokenizer.model"))
    a = run_cli("generate", "--prompt", "KING HENRY:", "--max-new-tokens", "48", "--json")
    b = run_cli_onnx("generate", "--model", folder, "--prompt", "KING HENRY:", "--max-new-tokens", "48", "--json")
    assert b.returncode == 0, b.stderr
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    tok = ErnieTokenizer(MODEL)
    ids = tok.encode("To be, or not")
    gen = GenerationConfig(max_new_tokens=32, eos_token_ids=[])
    assert generate(OnnxCausalLM(folder), ids, gen) == generate(model, ids, gen)

"""The `ernie-paddle` CLI contract, and bad input giving one named error line without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
from ernie_paddle.checkpoint.safetensors_io import CheckpointReader

from conftest import prompt, run_cli


def test_console_script_is_installed():
    # beside this interpreter (a virtual environment that is not activated), else on PATH
    exe = shutil.which("ernie-paddle", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    assert exe, "the ernie-paddle console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "make-checkpoint" in out.stdout


def test_generate_json_and_logits(tiny_ckpt, tmp_path):
    d, cfg = tiny_ckpt
    r = run_cli("generate", "--model", d, "--input-ids", "5,6,7", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model = Ernie4_5_MoeForCausalLM.from_pretrained(d)
    assert got["token_ids"] == generate(model, [5, 6, 7], GenerationConfig(max_new_tokens=6))
    r = run_cli("generate", "--model", d, "--input-ids", "5,6,7", "--max-new-tokens", "6", "--do-sample",
                "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--json")
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=3)
    assert json.loads(r.stdout)["token_ids"] == generate(model, [5, 6, 7], sampled)
    r = run_cli("generate", "--model", d, "--input-ids", "5,6,7", "--max-new-tokens", "4")
    assert r.returncode == 0 and len(r.stdout.split()) == 4 and "generated 4 tokens" in r.stderr
    out = tmp_path / "l.npy"
    r = run_cli("logits", "--model", d, "--input-ids", "1,2,3,4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, cfg.vocab_size)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask  # the usual permissions, not a temp file's 0600
    # the same fp32 model in another process: bit-equal unless the math library splits a reduction differently
    # under load (seen once with other work running), hence 1e-5 on logits of magnitude ~1
    assert np.abs(logits - model.logits([1, 2, 3, 4])).max() <= 1e-5


def test_make_checkpoint_and_convert(tmp_path):
    pd = tmp_path / "pd"
    r = run_cli("make-checkpoint", "--preset", "tiny", "--layout", "paddle", "--out", str(pd), "--seed", "2",
                "--num-layers", "2")
    assert r.returncode == 0, r.stderr
    assert "make-checkpoint: " in r.stderr and "100%" in r.stderr
    cfg = json.load(open(pd / "config.json"))
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    r = run_cli("convert", "--model", str(pd), "--out", str(tmp_path / "pt"), "--layout", "pt", "--dtype", "bfloat16",
                "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    reader = CheckpointReader(str(tmp_path / "pt"))
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in reader.names()
    assert os.path.exists(tmp_path / "pt" / "model.safetensors.index.json")
    ids = [3, 4, 5]
    a = Ernie4_5_MoeForCausalLM.from_pretrained(str(pd)).logits(ids)
    b = Ernie4_5_MoeForCausalLM.from_pretrained(str(tmp_path / "pt")).logits(ids)
    assert np.array_equal(a, b)  # the preset is written in bf16, so the bf16 conversion is lossless
    r = run_cli("convert", "--model", str(pd), "--out", str(tmp_path / "pt"), "--layout", "pt")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {tmp_path / 'pt'}: output directory already exists; choose a new one" in r.stderr


def broken(tiny_ckpt, tmp_path, how: str) -> str:
    d = str(tmp_path / "ck")
    shutil.copytree(tiny_ckpt[0], d)
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    if how == "missing-field":
        del cfg["num_key_value_heads"]
    elif how == "model-type":
        cfg["model_type"] = "qwen2_moe"
    elif how == "shape":
        cfg["moe_intermediate_size"] = 48
    elif how == "truncated":
        p = os.path.join(d, "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    elif how == "missing-shard":
        os.remove(os.path.join(d, "model.safetensors"))
        json.dump({"weight_map": {"ernie.norm.weight": "model-00001-of-00002.safetensors"}},
                  open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(cfg_path, "w"))
    return d


@pytest.mark.parametrize("how,message", [
    ("missing-field", "config.json: missing required field 'num_key_value_heads'"),
    ("model-type", "config.json: unknown model_type 'qwen2_moe'"),
    ("shape", r"tensor 'ernie.layers.1.mlp.experts.0.up_gate_proj.weight' in .*model.safetensors has shape "
              r"\[64, 64\], expected \[64, 96\]"),
    ("truncated", r"model.safetensors: file is truncated: tensor '.*' ends at byte"),
    ("missing-shard", "model-00001-of-00002.safetensors: shard listed in model.safetensors.index.json is missing"),
])
def test_bad_checkpoint_errors_without_traceback(tiny_ckpt, tmp_path, how, message):
    d = broken(tiny_ckpt, tmp_path, how)
    r = run_cli("logits", "--model", d, "--input-ids", "1,2", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), r.stderr
    assert not os.path.exists(tmp_path / "x.npy")


def test_token_id_out_of_range_and_bad_ids(tiny_ckpt):
    d, cfg = tiny_ckpt
    r = run_cli("generate", "--model", d, "--input-ids", f"1,{cfg.vocab_size + 5}", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (f"error: --input-ids: token id {cfg.vocab_size + 5} at position 1 is out of range for "
                        f"vocab_size {cfg.vocab_size}\n")  # checked against config.json before the weights load
    r = run_cli("generate", "--model", d, "--input-ids", "1,x", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "expected comma-separated integers" in r.stderr


def test_config_defaults_warn_and_strict_config_refuses(tiny_ckpt, tmp_path):
    d = str(tmp_path / "ck")
    shutil.copytree(tiny_ckpt[0], d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["rope_theta"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    r = run_cli("generate", "--model", d, "--input-ids", "1,2", "--max-new-tokens", "1", "--json")
    assert r.returncode == 0
    assert "warning: " in r.stderr and "field 'rope_theta' is missing; using 500000.0" in r.stderr
    r = run_cli("generate", "--model", d, "--input-ids", "1,2", "--max-new-tokens", "1", "--strict-config")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: " in r.stderr and "field 'rope_theta' is missing" in r.stderr and "strict config" in r.stderr


def test_generate_flags_not_given_take_generation_configs_defaults(tiny_ckpt):
    """--repetition-penalty, --prefill-chunk and the sampling flags default to GenerationConfig's own values (one
    place); --max-new-tokens of an --input-ids prompt too; given flags pass through as given."""
    from ernie_paddle.cli.paddle_cli import build_parser
    from ernie_paddle.cli.commands import Prompt, generation_config

    d, cfg = tiny_ckpt
    parse = build_parser().parse_args
    args = parse(["generate", "--model", d, "--input-ids", "1,2"])
    assert generation_config(args, Prompt([1, 2]), cfg) == GenerationConfig()
    args = parse(["generate", "--model", d, "--input-ids", "1,2", "--repetition-penalty", "1.3", "--prefill-chunk",
                  "7", "--max-new-tokens", "5", "--do-sample", "--temperature", "0.5", "--stop-ids", "3"])
    assert generation_config(args, Prompt([1, 2]), cfg) == GenerationConfig(
        max_new_tokens=5, do_sample=True, temperature=0.5, repetition_penalty=1.3, prefill_chunk=7,
        stop_token_ids=(3,))


def test_input_ids_from_file_and_prefill_chunk(tiny_ckpt, tmp_path):
    """`--input-ids @FILE` reads long prompts; any `--prefill-chunk` gives the same greedy tokens."""
    d, cfg = tiny_ckpt
    ids = prompt(300, cfg.vocab_size, seed=3)
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, ids[i:i + 20])) for i in range(0, 300, 20)))
    outs = []
    for chunk in ("512", "7"):
        r = run_cli("generate", "--model", d, "--input-ids", f"@{tmp_path / 'ids.txt'}", "--max-new-tokens", "6",
                    "--prefill-chunk", chunk, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["prompt_tokens"] == 300 and out["peak_rss_gib"] > 0
        outs.append(out["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 6
    r = run_cli("generate", "--model", d, "--input-ids", f"@{tmp_path / 'missing.txt'}")
    missing = tmp_path / "missing.txt"
    assert r.returncode == 2 and (f"error: argument --input-ids: @{missing}: cannot read it as UTF-8 text ([Errno 2] "
                                  f"No such file or directory: '{missing}')") in r.stderr, r.stderr
    r = run_cli("generate", "--model", d, "--input-ids", "1,2", "--prefill-chunk", "0")
    assert r.returncode == 2 and "error: prefill_chunk must be a positive integer, got 0" in r.stderr


# ---- --chat: the checkpoint's template in, reasoning / content / tool calls out ------------------------------------
class ScriptedModel:
    """Stands in for the model in `cli_commands.generate`: every call's greedy choice is the next id of `script`."""

    chunked_prefill_max_batch = None  # a causal_lm.CausalLM
    has_position_ids = True
    shares_kv_buffer = False

    def __init__(self, config, script: list[int]):
        self.config, self.script, self.calls = config, script, 0

    def check_ids(self, ids) -> None:
        pass

    def allocate_cache(self, batch: int, length: int) -> None:
        return None

    def __call__(self, ids, **kwargs):
        from types import SimpleNamespace

        logits = np.zeros((ids.shape[0], 1, self.config.vocab_size), np.float32)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def thinking_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a -Thinking-style tokenizer and chat template (tests/test_chat_template.py)."""
    from test_chat_template import make_thinking_checkpoint

    d = str(tmp_path_factory.mktemp("thinking") / "ck")
    shutil.copytree(tiny_ckpt[0], d)
    make_thinking_checkpoint(d)
    return d, tiny_ckpt[1]


def test_chat_prints_the_answer_and_json_has_its_parts(thinking_ckpt, tmp_path, capsys, monkeypatch):
    """`ernie-paddle generate --chat` run whole (in this process), with a model that answers as told."""
    from ernie_paddle.cli import paddle_cli as cli
    from ernie_paddle.text.tokenizer import ErnieTokenizer
    from test_chat_template import TOOLS

    d, cfg = thinking_ckpt
    tok = ErnieTokenizer(d)
    end = tok.token_to_id("<|im_end|>")

    def chat(answer: str, *flags: str) -> tuple[str, str]:
        script = tok.encode(answer) + [end]
        monkeypatch.setattr(cli, "_load_model", lambda args: ScriptedModel(cfg, script))
        assert cli.main(["generate", "--model", d, "--chat", "--prompt", "Weather in Rome?", *flags]) == 0
        out = capsys.readouterr()
        return out.out, out.err

    answer = "Rome is far.\n</think>\n\n<response>\nSunny, 24 degrees.\n</response>\n"
    out, err = chat(answer)
    assert out == "Sunny, 24 degrees.\n" and "Rome is far" not in err
    out, err = chat(answer, "--show-reasoning")
    assert out == "Sunny, 24 degrees.\n" and err.startswith("[reasoning] Rome is far.\n[prompt ")
    got = json.loads(chat(answer, "--json")[0])
    assert (got["reasoning"], got["content"], got["tool_calls"]) == ("Rome is far.", "Sunny, 24 degrees.", [])
    assert got["token_ids"] == tok.encode(answer) + [end]
    assert got["text"] == tok.decode(got["token_ids"], skip_special_tokens=True)  # as before --chat had parts

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    call = {"name": "get_weather", "arguments": {"city": "Rome"}}
    answer = f"Ask the tool.</think>\n\n<tool_call>\n{json.dumps(call)}\n</tool_call>\n"
    out, err = chat(answer, "--tools", str(tmp_path / "tools.json"), "--system", "Be brief.")
    assert out == f"tool call: {json.dumps(call)}\n\n"
    got = json.loads(chat(answer, "--tools", str(tmp_path / "tools.json"), "--system", "Be brief.", "--json")[0])
    assert (got["reasoning"], got["content"], got["tool_calls"]) == ("Ask the tool.", "", [call])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Rome?"}]
    assert got["prompt_tokens"] == len(tok.apply_chat_template(messages, tools=TOOLS))

    out, err = chat('Hm.</think><tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>')
    assert out == '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>\n'  # kept as text
    assert err.splitlines()[0] == ("warning: the model's tool call is not JSON (Expecting value: line 1 column 47 "
                                   "(char 46)); it is kept as text: '{\"name\": \"get_weather\", \"arguments\": "
                                   "{\"city\": }}'")


def test_generate_chat_json_end_to_end(thinking_ckpt):
    from ernie_paddle.text.chat_output import ChatFormat, parse_chat_output
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    d, _ = thinking_ckpt
    r = run_cli("generate", "--model", d, "--chat", "--prompt", "Weather in Rome?", "--max-new-tokens", "12",
                "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    tok = ErnieTokenizer(d)
    fmt = ChatFormat.of(tok)
    answer = parse_chat_output(tok.decode(got["token_ids"], skip_special_tokens=True, keep=fmt.tags), fmt, True)
    assert isinstance(got["reasoning"], str)  # the template opens <think>: the random model's text is reasoning
    assert (got["reasoning"], got["content"], got["tool_calls"]) == (answer.reasoning, answer.content,
                                                                     answer.tool_calls)
    assert 1 <= len(got["token_ids"]) <= 12 and "warning" not in r.stderr

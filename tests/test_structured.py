"""Structured output: `response_format` (json_object, json_schema) and a forced `tool_choice` decode under a
grammar (llguidance), on the shipped model exported to ONNX. Every answer parses and validates against its schema
(jsonschema), through the engine over HTTP, the `openai` client's parse helper and `ernie-onnx generate
--json-schema`; a constrained request batched with a free one leaves the free one's tokens as they are alone; a
schema that does not compile is a 400 naming its field."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import pydantic
import pytest

from ernie_paddle import grammar
from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.serving.app import start_service
from ernie_paddle.text.tokenizer import ErnieTokenizer

from conftest import run_cli_onnx
import test_server
from test_server import NAME, Wrapped, client_for, serving

onnx_dir = test_server.onnx_dir  # the shipped model exported to ONNX (a module fixture)

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {"mood": {"enum": ["merry", "sad", "wroth"]}, "armed": {"type": "boolean"},
                                      "lines": {"type": "array", "items": {"type": "integer", "minimum": 1,
                                                                           "maximum": 9}, "maxItems": 3}},
     "required": ["mood", "armed", "lines"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 2},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PROMPT = "KING RICHARD III:\nNow is"


class Player(pydantic.BaseModel):
    """The parse helper's response_format: a Pydantic model."""

    name: str = pydantic.Field(max_length=10)
    act: int = pydantic.Field(ge=1, le=5)
    alive: bool


# ---- the grammar engine alone --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_tok():
    tok = ErnieTokenizer(default_model_dir())
    return tok, grammar.grammar_tokenizer(default_model_dir(), tok.vocab_size, tok.stop_ids())


def _walk(constraint: grammar.Constraint, seed: int, steps: int = 200) -> list[int]:
    """Tokens chosen under the constraint from random logits, until the grammar is complete."""
    m, rng, out = constraint.matcher(), np.random.default_rng(seed), []
    for _ in range(steps):
        t = int(m.mask(rng.standard_normal(constraint.vocab_size).astype(np.float32)).argmax())
        assert m.consume(t), m.error
        out.append(t)
        if m.done:
            return out
    raise AssertionError(f"the grammar did not complete in {steps} tokens")


def test_masks_give_valid_json_from_random_logits(shipped_tok):
    tok, lt = shipped_tok
    assert grammar.grammar_tokenizer(default_model_dir(), tok.vocab_size, tok.stop_ids()) is lt  # cached per folder
    for schema in SCHEMAS:
        c = grammar.json_schema(lt, schema, tok.vocab_size)
        for seed in range(3):
            jsonschema.validate(json.loads(tok.decode(_walk(c, seed))), schema)
    c = grammar.tool_call(lt, [WEATHER, TIME], tok.vocab_size)
    text = tok.decode(_walk(c, 0))
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(call["arguments"], params[call["name"]])


def test_bad_and_large_schemas_are_named(shipped_tok):
    tok, lt = shipped_tok
    with pytest.raises(grammar.GrammarError, match=r"^the schema does not compile: Invalid type: frob$"):
        grammar.json_schema(lt, {"type": "frob"}, tok.vocab_size)
    with pytest.raises(grammar.GrammarError, match=r"does not compile: .*minimum \(5\) is greater than maximum \(1"):
        grammar.json_schema(lt, {"type": "integer", "minimum": 5, "maximum": 1}, tok.vocab_size)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(3000)}}
    n = len(json.dumps(big))
    with pytest.raises(grammar.GrammarError, match=rf"^the schema is too large: {n} characters of JSON, at most "
                                                   rf"{grammar.MAX_SCHEMA_CHARS}$"):
        grammar.json_schema(lt, big, tok.vocab_size)


# ---- served -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batches():
    """The batch sizes of the served model's calls (a decode step of two requests has two rows)."""
    return []


@pytest.fixture(scope="module")
def url(onnx_dir, batches):
    def before(ids):
        batches.append(ids.shape[0])
        threading.Event().wait(0.005)  # a little slower, so that requests sent together overlap

    service = start_service(Wrapped(OnnxCausalLM(onnx_dir, threads=1), before), onnx_dir, max_batch=4)
    with serving(service) as u:
        yield u


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_every_answer_validates_against_its_schema(url):
    chat = [{"role": "user", "content": "Who art thou?"}]
    for i, schema in enumerate(SCHEMAS):
        for route, body in (("chat/completions", {"messages": chat}), ("completions", {"prompt": PROMPT})):
            for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": i}):
                r = httpx.post(f"{url}/v1/{route}", json={**body, **sampling, "max_tokens": 120,
                                                          "response_format": _schema_format(schema)}, timeout=60)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                text = choice["message"]["content"] if route.startswith("chat") else choice["text"]
                assert choice["finish_reason"] == "stop", text
                jsonschema.validate(json.loads(text), schema)
    # any object: this model's keys ramble past max_tokens, so the answer is a prefix the grammar accepts
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat, "max_tokens": 30, "temperature": 0,
                                                       "response_format": {"type": "json_object"}}, timeout=60)
    choice = r.json()["choices"][0]
    text = choice["message"]["content"]
    assert (choice["finish_reason"], r.json()["usage"]["completion_tokens"]) == ("length", 30) and text[0] == "{"
    tok = ErnieTokenizer(default_model_dir())
    lt = grammar.grammar_tokenizer(default_model_dir(), tok.vocab_size, tok.stop_ids())
    m = grammar.json_object(lt, tok.vocab_size).matcher()
    assert all(m.consume(t) for t in lt.tokenize_str(text)) and not m.done
    assert not grammar.json_object(lt, tok.vocab_size).matcher().consume(lt.tokenize_str(" {")[0])
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                  "response_format": {"type": "text"}}, timeout=60)
    free = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                      timeout=60)
    assert r.json()["choices"][0]["text"] == free.json()["choices"][0]["text"]  # "text" constrains nothing


def test_openai_parse_helper_gets_validated_objects(url):
    client = client_for(url)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(3):
        answer = parse(model=NAME, messages=[{"role": "user", "content": "Name a player."}], response_format=Player,
                       max_tokens=80, temperature=1.0, seed=seed)
        player = answer.choices[0].message.parsed
        assert isinstance(player, Player) and 1 <= player.act <= 5 and len(player.name) <= 10


def test_forced_tool_calls_are_valid_calls(url):
    client = client_for(url)
    messages = [{"role": "user", "content": "What weather in Verona?"}]
    answer = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME], max_tokens=120,
                                            temperature=0, tool_choice={"type": "function",
                                                                        "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0].function
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(3):
        answer = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME], max_tokens=120,
                                                temperature=1.0, seed=seed, tool_choice="required")
        (tool_call,) = answer.choices[0].message.tool_calls
        jsonschema.validate(json.loads(tool_call.function.arguments), params[tool_call.function.name])


def test_constrained_row_leaves_a_batched_free_row_unchanged(url, onnx_dir, batches):
    tok = ErnieTokenizer(onnx_dir)
    alone = tok.decode(generate(OnnxCausalLM(onnx_dir, threads=1), tok.encode(PROMPT),
                                GenerationConfig(max_new_tokens=40, stop_token_ids=tuple(tok.stop_ids()))),
                       skip_special_tokens=True)
    free = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    constrained = {**free, "max_tokens": 120, "response_format": _schema_format(SCHEMAS[1])}
    batches.clear()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/completions", json=b, timeout=60) for b in (constrained, free)]
        a, b = (f.result().json()["choices"][0]["text"] for f in futures)
    assert 2 in batches  # the two decoded together
    jsonschema.validate(json.loads(a), SCHEMAS[1])
    assert b == alone


def test_schemas_that_do_not_compile_are_400s_naming_the_field(url):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        ({"response_format": _schema_format({"type": "frob"})}, "response_format",
         "response_format.json_schema.schema does not compile: Invalid type: frob"),
        ({"response_format": {"type": "xml"}}, "response_format",
         'response_format must be an object whose type is one of text, json_object, json_schema, got {"type": '
         '"xml"}'),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
         'response_format.json_schema must be an object with a "schema", got null'),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
          "tool_choice": "required"}, "tools[0].function.parameters",
         "tools[0].function.parameters does not compile: Invalid type: frob"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
         'tool_choice names the function "fly", which is not among tools ("get_weather")'),
        ({"tool_choice": "required"}, "tool_choice", 'tool_choice "required" needs at least one tool in tools'),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "response_format cannot be combined with a forced tool_choice (the answer is the tool "
                            "call)"),
    ]
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(3000)}}
    cases.append(({"response_format": _schema_format(big)}, "response_format",
                  f"response_format.json_schema.schema is too large: {len(json.dumps(big))} characters of JSON, at "
                  f"most {grammar.MAX_SCHEMA_CHARS}"))
    for extra, param, message in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"] == message
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "response_format": _schema_format({"type": 7})},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)  # the engine still serves
    assert ok.status_code == 200


def test_generate_json_schema_uses_the_same_code(onnx_dir, tmp_path):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    r = run_cli_onnx("generate", "--model", onnx_dir, "--prompt", PROMPT, "--json-schema", str(path),
                     "--max-new-tokens", "60", "--json")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(json.loads(r.stdout)["text"]), PERSON)
    path.write_text('{"type": "frob"}')
    r = run_cli_onnx("generate", "--model", onnx_dir, "--prompt", PROMPT, "--json-schema", str(path))
    assert r.returncode != 0 and r.stderr.strip().endswith("error: --json-schema does not compile: Invalid type: frob")


def test_grammar_bench_rows_and_json(tmp_path, capsys):
    from ernie_paddle.tools import grammar_bench

    out = tmp_path / "grammar.json"
    assert grammar_bench.main(["--vocab", "shipped", "--schemas", "person", "--repeats", "1", "--no-xgrammar",
                               "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert (row["vocabulary"], row["real_tokens"], row["schema"], row["engine"]) == ("shipped", 2048, "person",
                                                                                    "llguidance")
    assert row["tokens"] > 5 and 0 < row["mask_us_p50"] <= row["mask_us_p99"] and row["compile_ms"] > 0
    assert data["meta"]["vocab_size"] == 103424 and data["meta"]["cpu"]
    assert f"| shipped | 2048 | person | llguidance | {row['compile_ms']} |" in capsys.readouterr().out
    base = grammar_bench.shipped_pieces()
    pieces = grammar_bench.full_pieces(base, grammar_bench.VOCAB)
    added = pieces[len(base):]  # the full vocabulary: the shipped tokens, then new distinct ones
    assert pieces[:len(base)] == base and len(pieces) == 103424
    assert len(set(added) | set(base)) == len(set(base)) + len(added)


def test_schema_decode_compares_the_same_prompt_with_and_without_the_schema(onnx_dir, tmp_path, capsys):
    import json
    import jsonschema

    from ernie_paddle.generation import GenerationConfig, generate
    from ernie_paddle.tools import schema_decode

    out = tmp_path / "decode.json"
    assert schema_decode.main(["--model", onnx_dir, "--repeats", "1", "--max-new-tokens", "200", "--threads", "1",
                               "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["median"]) == {"plain", "schema"} and all(v > 0 for v in got["median"].values())
    assert got["tokens"]["plain"] == 200 and got["meta"]["cpu"]
    assert "schema / plain: " in capsys.readouterr().out
    # the schema run is a valid answer that ended where its grammar did
    model = OnnxCausalLM(onnx_dir)
    tok = ErnieTokenizer(onnx_dir)
    gen = GenerationConfig(max_new_tokens=200, eos_token_ids=[],
                           constraint=grammar.folder_schema(onnx_dir, schema_decode.SCHEMA, model.config.vocab_size))
    new = generate(model, tok.encode(schema_decode.PROMPT), gen)
    assert len(new) == got["tokens"]["schema"] < 200
    jsonschema.validate(json.loads(tok.decode(new, skip_special_tokens=True)), schema_decode.SCHEMA)

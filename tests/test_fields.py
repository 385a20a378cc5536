"""The everyday request fields (issue 23): presence and frequency penalties, logit_bias, min_tokens, chat logprobs and
stop lists, through the HTTP app (and so the engine) and through `generation.generate`; unknown fields and values
out of range refused by name. The shipped model exported to ONNX (fp32, ort flavour) serves in-process."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate, prefill, right_padded
from ernie_paddle.ort.runtime import OnnxCausalLM

from test_server import NAME, client, onnx_dir, service, tok, url  # noqa: F401

REPETITIVE = "To be, or not to be:"  # greedy repeats "I am a gentleman.\n\nISABELLA:\n" from its 12th token on


@pytest.fixture(scope="module")
def model(onnx_dir):  # noqa: F811
    return OnnxCausalLM(onnx_dir, threads=1)


def _greedy(model, tok, ids, n, **rules):  # noqa: F811
    return generate(model, ids, GenerationConfig(max_new_tokens=n, stop_token_ids=tuple(tok.stop_ids()), **rules))


def _last_logits(model, ids: list[int]) -> np.ndarray:
    """The runtime's logits after `ids`, from a fresh prefill of the whole sequence."""
    rows, mask, positions = right_padded([np.asarray(ids, np.int64)], model.config.pad_token_id, len(ids))
    return prefill(model, rows, mask, positions, model.allocate_cache(1, len(ids)), 512)[0].astype(np.float64)


def _post(url, route: str, body: dict) -> httpx.Response:  # noqa: F811
    return httpx.post(f"{url}/v1/{route}", content=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"}, timeout=60)


# ---- presence and frequency penalties ------------------------------------------------------------------------------
@pytest.mark.parametrize("presence,frequency", [(1.0, 0.0), (0.0, 0.7), (0.5, 0.5)])
def test_penalties_follow_openais_rule_on_the_runtimes_logits(model, tok, client, presence, frequency):  # noqa: F811
    ids, n = tok.encode(REPETITIVE), 30
    plain = _greedy(model, tok, ids, n)
    got = _greedy(model, tok, ids, n, presence_penalty=presence, frequency_penalty=frequency)
    expected: list[int] = []  # the rule applied by hand: logits - presence * (count > 0) - frequency * count
    for _ in range(n):
        counts = np.bincount(np.asarray(expected, np.int64), minlength=model.config.vocab_size)
        x = _last_logits(model, ids + expected) - presence * (counts > 0) - frequency * counts
        expected.append(int(x.argmax()))
    assert got == expected
    first = next(i for i, (a, b) in enumerate(zip(plain, got)) if a != b)  # where the penalty first acts
    assert got[:first] == plain[:first] and plain[first] in plain[:first]  # plain greedy repeated a token there
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=n, temperature=0, presence_penalty=presence,
                                  frequency_penalty=frequency)
    assert r.choices[0].text == tok.decode(got, skip_special_tokens=True)


def test_zero_penalties_change_nothing(model, tok, client):  # noqa: F811
    ids = tok.encode(REPETITIVE)
    plain = tok.decode(_greedy(model, tok, ids, 30), skip_special_tokens=True)
    r = client.completions.create(model=NAME, prompt=REPETITIVE, max_tokens=30, temperature=0, presence_penalty=0,
                                  frequency_penalty=0, logit_bias={}, extra_body={"min_tokens": 0})
    assert r.choices[0].text == plain


def test_rules_apply_per_request_inside_the_batch(model, tok, client):  # noqa: F811
    ids = tok.encode(REPETITIVE)
    rules = [{}, {"presence_penalty": 1.0}, {"logit_bias": {1000: 100.0}}, {"frequency_penalty": 0.7}]
    alone = [tok.decode(_greedy(model, tok, ids, 30, **r), skip_special_tokens=True) for r in rules]
    assert len(set(alone)) == 4

    def ask(r: dict) -> str:
        extra = {**r, "logit_bias": {str(k): v for k, v in r["logit_bias"].items()}} if "logit_bias" in r else r
        return client.completions.create(model=NAME, prompt=ids, max_tokens=30, temperature=0,
                                         **extra).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # the engine's 4 rows decode together
        assert list(pool.map(ask, rules * 2)) == alone * 2


# ---- logit_bias ----------------------------------------------------------------------------------------------------
def test_logit_bias_forces_a_token_greedy_and_sampled(client, tok):  # noqa: F811
    for temperature in (0, 1):
        r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=6, temperature=temperature, seed=3,
                                      logprobs=0, logit_bias={"1000": 100})
        assert r.choices[0].logprobs.tokens == [r.choices[0].logprobs.tokens[0]] * 6
        assert r.choices[0].text == tok.decode([1000] * 6)


def test_logit_bias_removes_the_greedy_token_and_only_it(model, tok, client):  # noqa: F811
    ids = tok.encode("ROMEO:")
    plain = _greedy(model, tok, ids, 8)
    logits = _last_logits(model, ids)
    runner_up = int(np.argsort(-logits, kind="stable")[1])
    banned = _greedy(model, tok, ids, 8, logit_bias={plain[0]: -100.0})
    assert banned[0] == runner_up != plain[0]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0,
                                  logit_bias={str(plain[0]): -100})
    assert r.choices[0].text == tok.decode(banned, skip_special_tokens=True)
    unused = next(t for t in range(100, 2000) if t not in plain)  # a bias on a token never chosen changes nothing
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, logit_bias={str(unused): -50})
    assert r.choices[0].text == tok.decode(plain, skip_special_tokens=True)


# ---- min_tokens ----------------------------------------------------------------------------------------------------
def test_min_tokens_keeps_the_end_away(model, tok, client):  # noqa: F811
    eos = model.config.eos_token_ids[0]
    ids = tok.encode("ROMEO:")
    assert _greedy(model, tok, ids, 10, logit_bias={eos: 100.0}) == [eos]  # the biased end comes first...
    out = _greedy(model, tok, ids, 10, logit_bias={eos: 100.0}, min_tokens=5)
    assert len(out) == 6 and out[-1] == eos and not set(out[:5]) & set(tok.stop_ids())  # ...once 5 tokens are out
    for stream in (False, True):
        body = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 10, "temperature": 0, "logit_bias": {str(eos): 100},
                "extra_body": {"min_tokens": 5}}
        if stream:
            r = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
            chunks = list(r)
            assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 6
        else:
            r = client.completions.create(**body)
            assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 6)
            assert r.choices[0].text == tok.decode(out, skip_special_tokens=True)


# ---- chat logprobs -------------------------------------------------------------------------------------------------
def test_chat_logprobs_equal_the_completions_routes(client, tok):  # noqa: F811
    messages = [{"role": "user", "content": "ROMEO:"}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    c = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == lp.tokens and len(content) == r.usage.completion_tokens == 12
    assert np.allclose([t.logprob for t in content], lp.token_logprobs, atol=1e-4, rtol=0)  # prefix reuse: 1e-4
    for t, top in zip(content, lp.top_logprobs):
        assert t.bytes == list(t.token.encode("utf-8"))
        assert [a.token for a in t.top_logprobs] == list(top)  # most likely first, as the dict is built
        assert np.allclose([a.logprob for a in t.top_logprobs], list(top.values()), atol=1e-4, rtol=0)
        assert t.top_logprobs[0].logprob == t.logprob  # greedy: the chosen token is the most likely
        assert all(a.bytes == list(a.token.encode("utf-8")) for a in t.top_logprobs)
    streamed = []
    for chunk in client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.top_logprobs[0].token) for t in streamed] == [(t.token, t.top_logprobs[0].token)
                                                                      for t in content]
    assert np.allclose([t.logprob for t in streamed], [t.logprob for t in content], atol=1e-4, rtol=0)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True)
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [0] * 4
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


# ---- stop lists ----------------------------------------------------------------------------------------------------
def test_a_stop_list_cuts_at_the_earliest_match(client, tok, model):  # noqa: F811
    ids = tok.encode("ROMEO:")
    full = tok.decode(_greedy(model, tok, ids, 24), skip_special_tokens=True)  # "\nO, then, I will not, I'll be..."
    early, late = "I will", "bawd"
    assert 0 < full.find(early) < full.find(late)
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0, stop=[late, early],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (full[:full.find(early)], "stop")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0, stop=["zzz", "qqq"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full, "length")


# ---- unknown fields and ranges -------------------------------------------------------------------------------------
HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("completions", {"prompt": "x", "frobnicate": 1}, "frobnicate",
     "unknown field 'frobnicate': /v1/completions does not implement it (the fields it takes are listed in "
     "docs/serving.md)"),
    ("chat/completions", {"messages": HI, "frobnicate": 1}, "frobnicate",
     "unknown field 'frobnicate': /v1/chat/completions does not implement it (the fields it takes are listed in "
     "docs/serving.md)"),
    ("completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs",  # a chat field on completions
     "unknown field 'top_logprobs': /v1/completions does not implement it (the fields it takes are listed in "
     "docs/serving.md)"),
    ("chat/completions", {"messages": HI, "audio": {"voice": "alloy"}}, "audio",
     'audio is not supported by this server, got {"voice": "alloy"}'),
    ("chat/completions", {"messages": HI, "modalities": ["text", "audio"]}, "modalities",
     'modalities is not supported by this server, got ["text", "audio"]'),
    ("completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty",
     "presence_penalty must be a number in [-2, 2], got 2.5"),
    ("chat/completions", {"messages": HI, "frequency_penalty": -3}, "frequency_penalty",
     "frequency_penalty must be a number in [-2, 2], got -3"),
    ("completions", {"prompt": "x", "frequency_penalty": "high"}, "frequency_penalty",
     'frequency_penalty must be a number in [-2, 2], got "high"'),
    ("completions", {"prompt": "x", "logit_bias": {"2048": 5}}, "logit_bias",
     "logit_bias token id 2048 is out of range for a vocabulary of 2048 tokens"),
    ("chat/completions", {"messages": HI, "logit_bias": {"hello": 5}}, "logit_bias",
     'logit_bias keys must be token ids (strings of digits), got "hello"'),
    ("completions", {"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias",
     "logit_bias[7] must be a number in [-100, 100], got 101"),
    ("completions", {"prompt": "x", "logit_bias": [7, 1]}, "logit_bias",
     "logit_bias must be an object mapping token ids to numbers, got [7, 1]"),
    ("completions", {"prompt": "x", "min_tokens": -1}, "min_tokens", "min_tokens must be an integer >= 0, got -1"),
    ("completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 8}, "min_tokens",
     "min_tokens 9 exceeds max_tokens (8)"),
    ("completions", {"prompt": "x", "min_tokens": 17}, "min_tokens",
     "min_tokens 17 exceeds the default max_tokens (16)"),
    ("chat/completions", {"messages": HI, "logprobs": 1}, "logprobs",
     "logprobs must be true or false on /v1/chat/completions, got 1"),
    ("chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs must be an integer in [0, 20], got 21"),
    ("chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs", 'top_logprobs needs "logprobs": true'),
]


@pytest.mark.parametrize("route,body,param,message", BAD, ids=[f"{p}-{i}" for i, (_, _, p, _) in enumerate(BAD)])
def test_bad_fields_are_400_naming_the_field(url, service, route, body, param, message):  # noqa: F811
    r = _post(url, route, body)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                  "code": None}}
    assert service.engine._thread.is_alive()


def test_harmless_client_fields_are_accepted(url, client):  # noqa: F811
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "seed": 1,
                "prompt_cache_key": "k", "safety_identifier": "s"}
    r = _post(url, "chat/completions", {"messages": HI, "max_tokens": 3, "temperature": 0, "modalities": ["text"],
                                        "parallel_tool_calls": True, "stream": False, **harmless})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = _post(url, "completions", {"prompt": "x", "max_tokens": 3, "temperature": 0, "user": "u-1"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0, user="u-1")
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("values,message", [
    ({"presence_penalty": 2.5}, "presence_penalty must be a number in [-2, 2], got 2.5"),
    ({"min_tokens": 40}, "min_tokens (40) must not exceed max_new_tokens (32)"),
    ({"min_tokens": -2}, "min_tokens must be a non-negative integer, got -2"),
    ({"logit_bias": {5: 200.0}}, "logit_bias[5] must be a number in [-100, 100], got 200.0"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be non-negative token ids, got -1"),
    ({"logit_bias": {3000: 1.0}, "vocab_limit": 2048},
     "logit_bias token id 3000 is out of range for a vocabulary of 2048"),
])
def test_generation_config_names_the_setting(values, message):
    with pytest.raises(InputError) as e:
        GenerationConfig(**values).validate()
    assert str(e.value) == message

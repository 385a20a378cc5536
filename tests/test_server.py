"""The OpenAI-compatible server (`ernie-onnx serve`, `ernie-paddle serve`), spoken to with the official `openai`
client: answers equal to generation run alone, streaming, stop strings, logprobs, tool calls, errors, limits,
disconnects, the API key and SIGTERM. The shipped model exported to ONNX (fp32, ort flavour) serves in-process
(uvicorn in a thread); a real `ernie-onnx serve` and `ernie-paddle serve` run as subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from ernie_paddle.text.chat_output import ChatFormat
from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.serving.app import create_app, start_service
from ernie_paddle.serving.server import listening_socket
from ernie_paddle.text.tokenizer import ErnieTokenizer

NAME = "shakespeare-onnx"  # the exported folder's name: the served model's name by default
HANG = 120  # seconds: only bounds a hang (every wait here is for an event that takes well under a second idle)
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "To be, or not to be:", "KING RICHARD III:\nNow is"]


def _readme_serving_lines() -> tuple[str, str, str]:
    """The README's serve and curl lines (its ```sh blocks) and its openai snippet (its ```py block), as written."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                encoding="utf-8").read()
    serve, curl = (block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S))
    (python,) = re.findall(r"```py\n(.*?)```", text, flags=re.S)
    return serve, curl, python


README_SERVE, README_CURL, README_PYTHON = _readme_serving_lines()


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> str:
    from ernie_paddle.export import pipeline

    out = str(tmp_path_factory.mktemp("export") / NAME)
    pipeline.export(default_model_dir(), out, flavor="ort", precision="fp32")
    return out


@pytest.fixture(scope="module")
def tok(onnx_dir) -> ErnieTokenizer:
    return ErnieTokenizer(onnx_dir)


@pytest.fixture(scope="module")
def alone(onnx_dir, tok):
    """`alone(ids, n)`: the greedy text of `generation.generate` on one prompt, as `ernie-paddle generate` runs it."""
    model = OnnxCausalLM(onnx_dir, threads=1)

    def run(ids: list[int], n: int) -> str:
        gen = GenerationConfig(max_new_tokens=n, stop_token_ids=tuple(tok.stop_ids()))
        return tok.decode(generate(model, ids, gen), skip_special_tokens=True)

    return run


@contextlib.contextmanager
def serving(service):
    """`service` answering on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive()) and server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        service.engine.shutdown(0)
        server.should_exit = True
        thread.join(HANG)
        sock.close()


@pytest.fixture(scope="module")
def service(onnx_dir):
    return start_service(OnnxCausalLM(onnx_dir, threads=1), onnx_dir, max_batch=4)


@pytest.fixture(scope="module")
def url(service):
    with serving(service) as u:
        yield u


def client_for(base: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60,
                         **kwargs)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return client_for(url)


class Wrapped:
    """The model, with `before(input_ids)` run before each call (a delay, or a fault for one prompt)."""

    def __init__(self, model, before):
        self.model, self.before = model, before

    def __call__(self, input_ids, **kwargs):
        self.before(np.asarray(input_ids))
        return self.model(input_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def wait_until(condition, seconds: float = HANG) -> bool:
    """Poll `condition` until it holds; False only if it never did for `seconds` (a hang, not a slow machine)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def metric(base: str, name: str, headers: dict | None = None) -> float:
    text = httpx.get(base + "/metrics", headers=headers).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


# ---- answers -------------------------------------------------------------------------------------------------------
def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = httpx.get(url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_completion_equals_generate_alone(client, tok, alone, url):
    before = {k: metric(url, f"ernie_engine_{k}_total") for k in ("decode_tokens", "prefill_tokens")}
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0)
    # the engine's counters: the prompt's 2 tokens prefilled, then 23 decode steps of one row (the first token
    # comes from the prefill)
    assert metric(url, "ernie_engine_prefill_tokens_total") - before["prefill_tokens"] == 2
    assert metric(url, "ernie_engine_decode_tokens_total") - before["decode_tokens"] == 23
    assert metric(url, "ernie_engine_decode_seconds_total") > 0
    assert r.choices[0].text == alone(tok.encode("ROMEO:"), 24)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 24, 26)
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # a prompt shorter than a block of the prefix cache
    ids = tok.encode("To be, or not to be:")  # a prompt given as token ids
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == alone(ids, 8)


def test_completion_logprobs(client, tok, alone):
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=10, temperature=0, logprobs=3)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text == alone(tok.encode("ROMEO:"), 10) and "".join(lp.tokens) == text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(10)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == chosen == max(top.values()) < 0  # greedy: the most likely token
    assert np.isclose(sum(np.exp(list(lp.top_logprobs[0].values()))), 1, atol=0.3)


def test_stop_string_cuts_the_text_and_ends_the_request(client, service, tok, alone):
    full = alone(tok.encode("ROMEO:"), 24)
    stop = "I will"
    assert stop in full
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]  # no part of it was ever sent
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wait_until(lambda: service.engine.batch_size == 0)


def test_four_concurrent_streams_equal_generate_alone(client, tok, alone):
    def run(prompt: str) -> tuple[str, str | None]:
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=32, temperature=0, stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, PROMPTS))
    for prompt, (text, reason) in zip(PROMPTS, results):
        assert text == alone(tok.encode(prompt), 32) and reason == "length"


def test_chat_whole_and_streamed(client, tok, alone):
    messages = [{"role": "system", "content": "Thou art a player."}, {"role": "user", "content": "Who art thou?"}]
    expected = alone(tok.apply_chat_template(messages), 20)
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=20, temperature=0)
    m = r.choices[0].message
    assert (m.role, m.content, m.tool_calls, m.model_extra["reasoning_content"]) == ("assistant", expected, [], None)
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(messages)) and r.usage.completion_tokens == 20
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


class ScriptedSlots:
    """A stand-in for the model's cache rows whose every request writes `script` (token ids), one token a step."""

    def __init__(self, script: list[int], vocab: int, capacity: int = 2, max_len: int = 2048):
        self.script, self.vocab, self.capacity, self.max_len = script, vocab, capacity, max_len
        self.at = [0] * capacity

    def _next(self, slot: int) -> np.ndarray:
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(self.at[slot], len(self.script) - 1)]] = 100.0  # sampled too: probability 1
        self.at[slot] += 1
        return logits

    def prefill(self, slot, ids, start):
        self.at[slot] = 0
        return self._next(slot)

    def decode(self, start, tokens, lengths):
        return np.stack([self._next(start + i) for i in range(len(tokens))])

    def move(self, src, dst, length):
        self.at[dst] = self.at[src]

    def release(self, slot):
        pass


def test_chat_reasoning_and_tool_calls(onnx_dir, tok):
    answer = ('<think>\nThe weather in Verona, then.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Verona"}}\n</tool_call>')
    slots = ScriptedSlots(tok.encode(answer) + [tok.eos_token_id], tok.vocab_size)
    # scripted rows hold no keys and values: no prefix cache to fill
    service = start_service(OnnxCausalLM(onnx_dir, threads=1), onnx_dir, slots=slots, prefix_cache_memory=0)
    service.model.chat = ChatFormat(reasoning=True, tool_calls=True)  # as a -Thinking checkpoint's template has
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Verona?"}]
    with serving(service) as base:
        client = client_for(base)
        r = client.chat.completions.create(model=NAME, messages=messages, tools=tools, max_tokens=100)
        m = r.choices[0].message
        assert (m.content, m.model_extra["reasoning_content"]) == (None, "The weather in Verona, then.")
        assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
            ("function", "get_weather", {"city": "Verona"})]
        assert r.choices[0].finish_reason == "tool_calls"
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, tools=tools, max_tokens=100,
                                                     stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The weather in Verona, then."
        calls = [t for d in deltas for t in d.tool_calls or ()]
        assert [(t.index, t.function.name, t.function.arguments) for t in calls] == [
            (0, "get_weather", '{"city": "Verona"}')]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=100)  # no tools: text
        assert "<tool_call>" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


# ---- bad requests --------------------------------------------------------------------------------------------------
BAD = [  # (endpoint, body, param, message)
    ("completions", b"{", None, "the request body is not valid JSON (Expecting property name enclosed in double "
                                "quotes: line 1 column 2 (char 1))"),
    ("completions", b"[1, 2]", None, "the request body must be a JSON object, got [1, 2]"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, "model",
     f'model "gpt-4" is not served here; this server serves "{NAME}"'),
    ("completions", {"prompt": "x", "temperature": -0.5}, "temperature",
     "temperature must be a number in [0, 2], got -0.5"),
    ("completions", {"prompt": "x", "temperature": 2.5}, "temperature", "temperature must be a number in [0, 2], "
                                                                         "got 2.5"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p", "top_p must be a number in (0, 1], got 0"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens",
     'max_tokens 0 (score the prompt only) needs "echo": true'),
    ("completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens",
     'max_tokens must be an integer >= 0, got "many"'),
    ("completions", {"prompt": "x", "n": 0}, "n", "n must be an integer in [1, 128], got 0"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream", 'stream must be true or false, got "yes"'),
    ("completions", {"prompt": "x", "stop": 5}, "stop", "stop must be a string or a list of strings, got 5"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20], got 21"),
    ("completions", {"prompt": "x", "seed": -1}, "seed", "seed must be an integer >= 0, got -1"),
    ("completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty",
     "presence_penalty must be a number in [-2, 2], got 2.5"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     'stream_options is only allowed with "stream": true'),
    ("completions", {"prompt": []}, "prompt", "prompt is an empty list: give at least one prompt (text or token ids)"),
    ("completions", {"prompt": ""}, "prompt", "prompt is empty: give at least one token to continue"),
    ("completions", {"prompt": [5, 4096]}, "prompt",
     "prompt: token id 4096 at position 1 is out of range for vocab_size 2048"),
    ("completions", {"prompt": [100] * 2040}, "prompt",
     "prompt of 2040 tokens + max_tokens 16 = 2056 exceeds the context of 2048 tokens"),
    ("completions", {"prompt": [100] * 2040, "max_tokens": 9}, "max_tokens",
     "prompt of 2040 tokens + max_tokens 9 = 2049 exceeds the context of 2048 tokens"),
    ("completions", {"prompt": "x", "stop_token_ids": [2, 2048]}, "stop_token_ids[1]",
     "stop_token_ids[1] must be an integer in [0, 2047], got 2048"),
    ("chat/completions", {}, "messages", "messages must be a non-empty list of messages, got null"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role",
     'messages[0].role must be one of system, developer, user, assistant, tool, got "wizard"'),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is missing"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens", "max_completion_tokens must be an integer >= 1, got 0"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs",
     "logprobs must be true or false on /v1/chat/completions, got 3"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice",
     'tool_choice "required" needs at least one tool in tools'),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools[0]", 'tools[0] must be {"type": "function", "function": {...}}, got {"type": "function"}'),
]


@pytest.mark.parametrize("endpoint,body,param,message", BAD, ids=[f"{e}-{p}-{i}" for i, (e, _, p, _) in enumerate(BAD)])
def test_bad_request_is_400_naming_the_field(url, endpoint, body, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/{endpoint}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                  "code": "model_not_found" if param == "model" else None}}


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=3)
    assert (e.value.status_code, e.value.param, e.value.message) == (
        400, "temperature", "Error code: 400 - temperature must be a number in [0, 2], got 3")


# ---- faults and limits ---------------------------------------------------------------------------------------------
def test_a_request_the_model_fails_fails_alone(url, service, client, tok, alone, monkeypatch):
    poison = [7, 7, 7, 7, 7]

    def fail_on_poison(ids):
        if ids.shape[0] == 1 and ids[0].tolist() == poison:
            raise RuntimeError("injected fault")

    monkeypatch.setattr(service.engine.slots, "model", Wrapped(service.engine.slots.model, fail_on_poison))
    stream = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=32, temperature=0, stream=True)
    first = next(iter(stream))  # the healthy request is running
    r = httpx.post(url + "/v1/completions", json={"prompt": poison, "max_tokens": 4})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "the model failed on this request: injected fault",
                                  "type": "server_error", "param": None, "code": "model_error"}}
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == alone(tok.encode("ROMEO:"), 32)


@pytest.fixture
def slow_service(onnx_dir):
    """One row, one waiting place, 20 ms per model call: requests stay in flight long enough to look at."""
    service = start_service(OnnxCausalLM(onnx_dir, threads=1), onnx_dir, max_batch=1, max_queue=1)
    service.engine.slots.model = Wrapped(service.engine.slots.model, lambda ids: time.sleep(0.02))
    return service


def submitted(engine, monkeypatch) -> list:
    """The engine requests the routes submit from now on, to see how each ended (cut short, or run to the end)."""
    seen = []
    real = engine.submit

    def record(req) -> None:
        real(req)
        seen.append(req)

    monkeypatch.setattr(engine, "submit", record)
    return seen


def test_queue_full_is_429_and_a_client_leaving_frees_its_slot(slow_service, monkeypatch):
    engine = slow_service.engine
    reqs = submitted(engine, monkeypatch)
    with serving(slow_service) as base:
        client = client_for(base)
        running = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=500, temperature=0, stream=True)
        next(iter(running))
        waiting = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=500, temperature=0, stream=True)
        assert (engine.batch_size, engine.queue_depth) == (1, 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5)
        assert e.value.status_code == 429
        assert e.value.body == {"message": "the queue is full (1 waiting requests); retry later",
                                "type": "rate_limit_error", "param": None, "code": "queue_full"}
        first, second = reqs
        running.close()  # the client goes away mid-stream: its row is freed, the waiting request gets it
        assert wait_until(lambda: engine.queue_depth == 0 and engine.batch_size == 1)
        # cancelled, not run to its end (500 tokens take 10 s at 20 ms a step, however idle the machine)
        assert first.cancelled and first.generated < 500
        waiting.close()
        assert wait_until(lambda: engine.batch_size == 0)
        assert second.cancelled and second.generated < 500
        assert metric(base, "ernie_num_requests_running") == 0 and metric(base, "ernie_num_requests_waiting") == 0
        assert metric(base, 'ernie_requests_total{endpoint="/v1/completions",status="429"}') == 1


def test_a_client_leaving_a_whole_answer_frees_its_slot(slow_service, monkeypatch):
    reqs = submitted(slow_service.engine, monkeypatch)
    with serving(slow_service) as base:
        with pytest.raises(httpx.ReadTimeout):  # the answer needs 10 s (500 steps of 20 ms): the client gives up
            httpx.post(base + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 500}, timeout=0.3)
        assert wait_until(lambda: slow_service.engine.batch_size == 0)
        (req,) = reqs
        assert req.cancelled and req.generated < 500  # freed because the client left, not because it finished


def test_shutdown_aborts_what_the_grace_period_did_not_finish(slow_service):
    with serving(slow_service) as base:
        client = client_for(base)
        stream = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=500, temperature=0, stream=True)
        next(iter(stream))
        slow_service.engine.shutdown(0)
        with pytest.raises(openai.APIError, match="^the server shut down before the request finished$"):
            list(stream)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5)
        assert (e.value.status_code, e.value.body["message"]) == (503, "the server is shutting down")
        assert httpx.get(base + "/health").status_code == 503


def test_api_key(onnx_dir, monkeypatch):
    service = start_service(OnnxCausalLM(onnx_dir, threads=1), onnx_dir, api_key="sesame")
    with serving(service) as base:
        with pytest.raises(openai.AuthenticationError) as e:
            client_for(base, api_key="wrong").completions.create(model=NAME, prompt="ROMEO:", max_tokens=2)
        assert e.value.status_code == 401
        assert e.value.body == {"message": 'missing or wrong API key: send the header "Authorization: Bearer <key>"',
                                "type": "authentication_error", "param": None, "code": "invalid_api_key"}
        assert httpx.get(base + "/metrics").status_code == 401
        r = client_for(base, api_key="sesame").completions.create(model=NAME, prompt="ROMEO:", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert httpx.get(base + "/health").status_code == 200  # health stays open (load balancers probe it)
        assert metric(base, 'ernie_requests_total{endpoint="/v1/completions",status="401"}',
                      {"Authorization": "Bearer sesame"}) == 1


# ---- the command lines ---------------------------------------------------------------------------------------------
def start_server(argv: list[str], cwd: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A `serve` command on a free port; returns it and its base URL once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--port", "0"], cwd=cwd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"^serving \S+ on (http://127\.0\.0\.1:\d+)/v1 ", line)
        if found:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, found.group(1)
    raise AssertionError("the server did not start:\n" + "".join(lines))


def test_onnx_serve_answers_the_readme_lines_and_sigterm_exits_0(onnx_dir, tok, alone, capsys):
    # a grace period no loaded machine exceeds for the stream below, and longer than the wait for the exit: it
    # must end as soon as the stream does
    argv = ["ernie_paddle.cli.onnx_cli"] + README_SERVE.split()[1:] + ["--threads", "1", "--grace-period", "600"]
    proc, base = start_server(argv, cwd=os.path.dirname(onnx_dir))
    try:
        port = base.rsplit(":", 1)[1]
        curl = subprocess.run(README_CURL.replace(":8000", f":{port}"), shell=True, capture_output=True, text=True,
                              timeout=60)
        assert json.loads(curl.stdout)["choices"][0]["text"] == alone(tok.encode("ROMEO:"), 24)
        exec(README_PYTHON.replace(":8000", f":{port}"), {})
        messages = [{"role": "user", "content": "What news from Padua?"}]
        assert capsys.readouterr().out == alone(tok.apply_chat_template(messages), 40) + "\n"
        stream = client_for(base).completions.create(model=NAME, prompt="ROMEO:", max_tokens=300, temperature=0,
                                                      stream=True)
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)  # in flight: it finishes within the grace period
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].text for c in chunks) == alone(tok.encode("ROMEO:"), 300)
        assert proc.wait(HANG) == 0
    finally:
        proc.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health")


def test_paddle_serve_answers_as_paddle_generate(tmp_path, capsys):
    from ernie_paddle.cli import paddle_cli as cli

    proc, base = start_server(["ernie_paddle.cli.paddle_cli", "serve", "--max-batch", "2"], cwd=str(tmp_path),
                              env={"ERNIE_API_KEY": "sesame"})
    try:
        assert cli.main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "12", "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)["text"]
        assert httpx.get(base + "/v1/models").status_code == 401  # the key from the environment
        r = client_for(base, api_key="sesame").completions.create(model="ernie-4.5-shakespeare", prompt="ROMEO:",
                                                                  max_tokens=12, temperature=0)
        assert r.choices[0].text == expected and r.usage.completion_tokens == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0
    finally:
        proc.kill()


def test_serving_an_onnx_folder_never_imports_paddle(onnx_dir):
    code = ("import sys; from ernie_paddle.cli import onnx_cli; from ernie_paddle.serving import app, server; "
            "from ernie_paddle.ort.runtime import OnnxCausalLM; "
            f"s = app.start_service(OnnxCausalLM({onnx_dir!r}), {onnx_dir!r}); app.create_app(s); "
            "s.engine.shutdown(0); print('paddle' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "False\n"), r.stderr


def test_serve_defaults_and_a_missing_extra(onnx_dir, monkeypatch, capsys):
    from ernie_paddle.cli import onnx_cli

    args = onnx_cli.build_parser().parse_args(["serve", "--model", onnx_dir])
    assert (args.host, args.port, args.max_batch, args.max_queue, args.grace_period) == ("127.0.0.1", 8000, 4, 64, 30)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert onnx_cli.main(["serve", "--model", onnx_dir]) == 2
    assert capsys.readouterr().err == 'error: serving needs fastapi: pip install -e ".[serve]"\n'

"""The server's side of prefix reuse: `usage.prompt_tokens_details.cached_tokens` on every answer, the prefix cache's
metrics, a client leaving in mid-prefill, `serve --prefix-cache-memory` and `--prefix-cache-dir` across a restart
and against a file of another model. Answers reusing a prefix are compared with a server without a prefix cache
(`prefix_cache_memory=0`): the same greedy text, to the character."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.scoring import shared_prefix
from ernie_paddle.serving.app import start_service
from ernie_paddle.serving.prefix_cache import BLOCK_TOKENS, DEFAULT_PREFIX_CACHE_MEMORY, FILE, PrefixCache, \
    bytes_per_token

from test_server import (HANG, NAME, Wrapped, client_for, metric, onnx_dir, serving, start_server,  # noqa: F401
                         submitted, tok, wait_until)

# Token prompts sharing their first 70 tokens (two whole blocks, then 6 of a third), as a document asked twice.
BASE = [(7 * i + 11) % 1900 + 40 for i in range(70)]
FIRST, SECOND = BASE + [101, 102, 103], BASE + [201, 202, 203, 204]
SHARED = 70 // BLOCK_TOKENS * BLOCK_TOKENS  # 64: the prefix cache matches whole blocks


def _service(folder: str, **options):
    return start_service(OnnxCausalLM(folder, threads=1), folder, max_batch=2, **options)


@pytest.fixture(scope="module")
def plain(onnx_dir):  # noqa: F811
    """The same model served without a prefix cache: the answers reuse must equal."""
    with serving(_service(onnx_dir, prefix_cache_memory=0)) as base:
        yield client_for(base)


def _complete(client, ids: list[int], n: int = 24):
    return client.completions.create(model=NAME, prompt=ids, max_tokens=n, temperature=0)


def _token_bytes(folder: str) -> int:
    model = OnnxCausalLM(folder, threads=1)
    assert model.identity["kv_dtype"] == "float32"  # the fp32 export's cache: 4 bytes an element
    return bytes_per_token(model.config, 4)


def test_a_second_request_sharing_a_prefix_is_answered_from_the_cache(onnx_dir, plain):  # noqa: F811
    with serving(_service(onnx_dir)) as base:
        client = client_for(base)
        q0, h0 = metric(base, "ernie_prefix_cache_queries_total"), metric(base, "ernie_prefix_cache_hits_total")
        assert (q0, h0) == (0, 0)
        a = _complete(client, FIRST)
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        assert metric(base, "ernie_prefix_cache_queries_total") == len(FIRST)  # every prompt token is looked up
        assert metric(base, "ernie_prefix_cache_hits_total") == 0
        b = _complete(client, SECOND)
        assert (b.usage.prompt_tokens, b.usage.prompt_tokens_details.cached_tokens) == (len(SECOND), SHARED)
        assert metric(base, "ernie_prefix_cache_queries_total") == len(FIRST) + len(SECOND)
        assert metric(base, "ernie_prefix_cache_hits_total") == SHARED
        # the pool holds FIRST with its answer (73 + 23 computed tokens: 3 blocks), and SECOND's own third block
        # (74 + 23; its first two are FIRST's): 4 blocks, each token 2 x layers x kv heads x head_dim x 4 bytes
        assert metric(base, "ernie_prefix_cache_bytes") == 4 * BLOCK_TOKENS * _token_bytes(onnx_dir)
        assert metric(base, "ernie_prefix_cache_max_bytes") == DEFAULT_PREFIX_CACHE_MEMORY
        # the same text as without any cache; that server reports no cached token
        for ids, got in ((FIRST, a), (SECOND, b)):
            want = _complete(plain, ids)
            assert got.choices[0].text == want.choices[0].text and want.usage.prompt_tokens_details.cached_tokens == 0
        # streamed: the usage chunk carries the count (the prompt's whole blocks: its third holds answer tokens)
        chunks = list(client.completions.create(model=NAME, prompt=SECOND, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == SHARED
        assert metric(base, "ernie_prefix_cache_hits_total") == 2 * SHARED
        assert "".join(c.choices[0].text for c in chunks if c.choices) == b.choices[0].text


def test_a_chat_turn_reuses_the_conversation_so_far(onnx_dir, plain, tok):  # noqa: F811
    system = {"role": "system", "content": "Thou art a player of the Globe, and answerest in verse. " * 3}
    turn1 = [system, {"role": "user", "content": "What news from Padua, good sir?"}]
    with serving(_service(onnx_dir)) as base:
        client = client_for(base)
        r1 = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=16, temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And from Verona?"}]
        p1, p2 = tok.apply_chat_template(turn1), tok.apply_chat_template(turn2)
        assert len(p1) > 2 * BLOCK_TOKENS
        chunks = list(client.chat.completions.create(model=NAME, messages=turn2, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
        # at least the whole blocks of the first turn's prompt; whole blocks, never the last prompt token
        assert shared_prefix(p1, p2) // BLOCK_TOKENS * BLOCK_TOKENS <= cached < len(p2)
        assert cached % BLOCK_TOKENS == 0
        want = plain.chat.completions.create(model=NAME, messages=turn2, max_tokens=16, temperature=0)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
        r2 = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=16, temperature=0)
        assert r2.usage.prompt_tokens_details.cached_tokens >= cached
        assert r2.choices[0].message.content == want.choices[0].message.content


def test_a_client_leaving_in_mid_prefill_leaves_nothing_in_use(onnx_dir, plain, monkeypatch):  # noqa: F811
    """A 256-token prompt prefilled 32 tokens a step, 0.2 s a step: the client goes once 64 are computed."""
    service = _service(onnx_dir, prefill_chunk=BLOCK_TOKENS)
    engine = service.engine
    engine.slots.model = Wrapped(engine.slots.model, lambda ids: time.sleep(0.2))
    reqs = submitted(engine, monkeypatch)
    prompt = [(13 * i + 5) % 1900 + 40 for i in range(256)]
    with serving(service) as base:
        port = int(base.rsplit(":", 1)[1])
        body = ('{"prompt": %s, "max_tokens": 4}' % prompt).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert wait_until(lambda: reqs and reqs[0].filled >= 2 * BLOCK_TOKENS)
        assert wait_until(lambda: engine.idle())
        (req,) = reqs
        assert req.cancelled and req.filled < len(prompt) and req.generated == 0  # cut short in its prefill
        assert (engine.batch_size, engine.queue_depth, engine.prefilling, engine.running) == (0, 0, None, [])
        # the pool holds what was computed, in whole blocks, and nothing else
        kept = engine.prefix.tokens()
        assert kept == req.filled // BLOCK_TOKENS * BLOCK_TOKENS >= 2 * BLOCK_TOKENS
        assert engine.prefix.nbytes == kept * _token_bytes(onnx_dir)
        # and it is exact: the same prompt again takes those tokens and answers as without a cache
        engine.slots.model = engine.slots.model.model
        r = _complete(client_for(base), prompt, 4)
        assert r.usage.prompt_tokens_details.cached_tokens == kept
        assert r.choices[0].text == _complete(plain, prompt, 4).choices[0].text


def test_the_prefix_cache_dir_survives_a_restart(onnx_dir, plain, tmp_path):  # noqa: F811
    folder = tmp_path / "kept" / "prefixes"  # made at start
    argv = ["ernie_paddle.cli.onnx_cli", "serve", "--model", onnx_dir, "--threads", "1",
            "--prefix-cache-dir", str(folder), "--prefix-cache-memory", "64MiB"]
    proc, base = start_server(argv, cwd=str(tmp_path))
    try:
        assert os.path.isdir(folder) and not os.path.exists(folder / FILE)
        assert _complete(client_for(base), FIRST).usage.prompt_tokens_details.cached_tokens == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0
    finally:
        proc.kill()
    saved = PrefixCache(1 << 30)
    identity = OnnxCausalLM(onnx_dir, threads=1).identity
    assert saved.load(str(folder / FILE), identity) == 3  # FIRST and its answer: 73 + 23 computed, 3 blocks
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--port", "0"], cwd=str(tmp_path), stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        while not line.startswith("serving "):
            line = proc.stderr.readline()
            assert line, "the server did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # uvicorn's log, never read
        per_token = _token_bytes(onnx_dir)
        holds = (64 << 20) // (per_token * BLOCK_TOKENS) * BLOCK_TOKENS
        assert f", prefix cache 64 MiB: {holds} tokens, 96 loaded from {folder / FILE})" in line
        url = line.split(" on ", 1)[1].split("/v1 ", 1)[0]
        r = _complete(client_for(url), SECOND)  # its first request
        assert r.usage.prompt_tokens_details.cached_tokens == SHARED
        assert r.choices[0].text == _complete(plain, SECOND).choices[0].text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0
    finally:
        proc.kill()
    assert PrefixCache(1 << 30).load(str(folder / FILE), identity) == 4  # SECOND's third block added


def _serve_fails(onnx_dir: str, folder, cwd) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "ernie_paddle.cli.onnx_cli", "serve", "--model", onnx_dir,
                           "--port", "0", "--prefix-cache-dir", str(folder)], cwd=str(cwd), capture_output=True,
                          text=True, timeout=HANG)


def test_a_prefix_cache_of_another_model_or_corrupt_is_refused_naming_the_file(onnx_dir, tmp_path):  # noqa: F811
    identity = OnnxCausalLM(onnx_dir, threads=1).identity
    path = tmp_path / FILE
    PrefixCache(1 << 20).save(str(path), {**identity, "model": "sha256:another"})
    r = _serve_fails(onnx_dir, tmp_path, tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"error: {path}: saved by another model: 'sha256:another', this one is {identity['model']!r}\n"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # corrupt
    r = _serve_fails(onnx_dir, tmp_path, tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: ") and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "a-file").write_text("")  # a folder that cannot be made: refused before the model loads
    r = _serve_fails(onnx_dir, tmp_path / "a-file", tmp_path)
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'a-file'}: cannot make the prefix cache folder: "
                                           "File exists\n")


def test_prefix_cache_memory_argument(onnx_dir):  # noqa: F811
    from ernie_paddle.cli import onnx_cli, paddle_cli

    parse = onnx_cli.build_parser().parse_args
    assert parse(["serve", "--model", onnx_dir]).prefix_cache_memory == DEFAULT_PREFIX_CACHE_MEMORY == 1 << 30
    assert parse(["serve", "--model", onnx_dir]).prefix_cache_dir is None
    assert parse(["serve", "--model", onnx_dir, "--prefix-cache-memory", "0"]).prefix_cache_memory == 0
    assert parse(["serve", "--model", onnx_dir, "--prefix-cache-memory", "512MiB"]).prefix_cache_memory == 512 << 20
    assert paddle_cli.build_parser().parse_args(["serve", "--prefix-cache-memory", "2GB"]).prefix_cache_memory == 2e9
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.cli.onnx_cli", "serve", "--model", onnx_dir,
                        "--prefix-cache-memory", "-1"], capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 2 and "argument --prefix-cache-memory: expected a positive size like 24GB, 24GiB or " \
                                 "500MB, got '-1'" in r.stderr
    service = _service(onnx_dir, prefix_cache_memory=0)
    try:
        assert service.engine.prefix.max_bytes == 0 and service.prefix_cache_file is None
    finally:
        service.engine.shutdown(0)


def test_usage_has_cached_tokens_on_every_endpoint_when_nothing_is_cached(onnx_dir):  # noqa: F811
    with serving(_service(onnx_dir)) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3}).json()
        assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                              "prompt_tokens_details": {"cached_tokens": 0}}
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 3}).json()
        assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

"""Automatic prefix reuse (serving.prefix_cache in the engine): a request reuses the longest cached prefix of its
prompt and answers exactly as without it, on the ONNX Runtime model (shared rows) and the Paddle model (a cache per
request). Exact means identical greedy tokens and log-probabilities within 1e-4, the tolerance of chunked prefill
(a reused prefix changes only where the prompt's passes start)."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.serving.engine import Engine, Request, Token
from ernie_paddle.serving.prefix_cache import BLOCK_TOKENS, PrefixCache

from conftest import prompt

TOL = 1e-4  # log-probabilities, with reuse against without (chunked prefill's tolerance)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


class Run:
    """A request and what it emitted."""

    def __init__(self, ids: list[int], new: int = 8, chunk: int = 24):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finished = None
        gen = GenerationConfig(max_new_tokens=new, eos_token_ids=[], prefill_chunk=chunk)
        self.req = Request(list(ids), gen, self, logprobs=0)

    def __call__(self, event) -> None:
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.logprobs.append(event.logprob)
        else:
            self.finished = event


def run(engine: Engine, *runs: Run) -> None:
    for r in runs:
        engine.submit(r.req)
    while not engine.idle():
        engine.step()


def alone(model, ids: list[int], new: int = 8, chunk: int = 24) -> Run:
    """The same request on an engine without a prefix cache."""
    r = Run(ids, new, chunk)
    run(Engine(model, max_batch=2, prefix_cache_memory=0), r)
    return r


def assert_same(got: Run, want: Run) -> None:
    assert got.tokens == want.tokens
    assert np.abs(np.array(got.logprobs) - np.array(want.logprobs)).max() <= TOL


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_a_match_ending_inside_a_prefill_chunk(models, kind):
    """The first prompt is prefilled in chunks of 24; the block boundary at 32 falls inside its second chunk."""
    model, vocab = models[kind], models[kind].config.vocab_size
    first = prompt(50, vocab, seed=1)
    second = first[:40] + prompt(20, vocab, seed=2)
    engine = Engine(model, max_batch=2)
    a, b = Run(first), Run(second)
    run(engine, a)
    run(engine, b)
    assert (a.req.cached_tokens, b.req.cached_tokens) == (0, 32)
    assert_same(a, alone(model, first))
    assert_same(b, alone(model, second))
    assert b.tokens == generate(model, second, b.req.gen)


@pytest.mark.parametrize("k", [31, 32, 33, 70])
def test_prompts_diverging_at_token_k_reuse_the_blocks_before_it(models, k):
    model, vocab = models["onnx"], models["onnx"].config.vocab_size
    first = prompt(80, vocab, seed=3)
    second = first[:k] + [(first[k] + 1) % vocab] + prompt(10, vocab, seed=4)
    engine = Engine(model, max_batch=2)
    run(engine, Run(first))
    b = Run(second)
    run(engine, b)
    assert b.req.cached_tokens == k // BLOCK_TOKENS * BLOCK_TOKENS
    assert_same(b, alone(model, second))


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_a_wholly_cached_prompt_still_computes_its_last_token(models, kind):
    model, vocab = models[kind], models[kind].config.vocab_size
    ids = prompt(64, vocab, seed=5)  # two whole blocks
    engine = Engine(model, max_batch=2)
    a, b = Run(ids), Run(ids)
    run(engine, a)
    run(engine, b)
    assert b.req.cached_tokens == 63  # the last prompt token is run again: its logits choose the first token
    assert_same(b, a)


def test_the_answer_is_cached_too(models):
    """A follow-up prompt that holds the first prompt and its answer reuses both (a chat's next turn)."""
    model, vocab = models["onnx"], models["onnx"].config.vocab_size
    first = prompt(40, vocab, seed=6)
    engine = Engine(model, max_batch=2)
    a = Run(first, new=30)
    run(engine, a)
    follow = first + a.tokens + prompt(5, vocab, seed=7)
    b = Run(follow)
    run(engine, b)
    assert b.req.cached_tokens == (40 + 30 - 1) // BLOCK_TOKENS * BLOCK_TOKENS == 64
    assert_same(b, alone(model, follow))


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_two_concurrent_requests_share_a_prefix(models, kind):
    model, vocab = models[kind], models[kind].config.vocab_size
    shared = prompt(70, vocab, seed=8)
    p1, p2 = shared + prompt(6, vocab, seed=9), shared + prompt(9, vocab, seed=10)
    engine = Engine(model, max_batch=2)
    a, b = Run(p1, new=12), Run(p2, new=12)
    run(engine, a, b)  # both queued at once: the second is admitted once the first has prefilled
    assert (a.req.cached_tokens, b.req.cached_tokens) == (0, 64)
    assert_same(a, alone(model, p1, new=12))
    assert_same(b, alone(model, p2, new=12))


def test_a_request_cancelled_in_mid_prefill_offers_only_what_it_computed(models):
    model, vocab = models["onnx"], models["onnx"].config.vocab_size
    ids = prompt(120, vocab, seed=11)
    engine = Engine(model, max_batch=2)
    a = Run(ids, chunk=40)
    engine.submit(a.req)
    engine.step()
    engine.step()  # two chunks: 80 tokens computed
    assert engine.prefilling is a.req and a.req.filled == 80
    engine.cancel(a.req)
    engine.step()
    assert a.finished.reason == "cancelled" and engine.idle()
    assert engine.prefix.tokens() == 64  # the blocks wholly inside the 80 computed tokens
    b = Run(ids, chunk=40)
    run(engine, b)
    assert b.req.cached_tokens == 64
    assert_same(b, alone(model, ids, chunk=40))


def test_reuse_is_counted_and_off_at_zero(models):
    model, vocab = models["onnx"], models["onnx"].config.vocab_size
    ids = prompt(50, vocab, seed=12)
    engine = Engine(model, max_batch=2, prefix_cache_memory=0)
    run(engine, Run(ids), Run(ids))
    assert (engine.prefix.queried_tokens, engine.prefix.hit_tokens, engine.prefix.nbytes) == (100, 0, 0)
    engine = Engine(model, max_batch=2)
    run(engine, Run(ids))
    run(engine, Run(ids))
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 keys and values
    assert (engine.prefix.queried_tokens, engine.prefix.hit_tokens) == (100, 32)
    assert engine.prefix.nbytes == engine.prefix.tokens() * per_token == 32 * per_token


def kv_of(n_tokens: int, layers: int = 2, fill: float = 0.0):
    return [tuple(np.full((1, n_tokens, 4), fill + i, np.float32) for _ in "kv") for i in range(layers)]


def test_the_pool_evicts_the_least_recently_used_block_and_keeps_prefixes_longest():
    block_bytes = 2 * 2 * BLOCK_TOKENS * 4 * 4  # 2 layers x (key, value) x [1, 32, 4] float32
    pool = PrefixCache(max_bytes=3 * block_bytes)
    a, b = np.arange(64), np.arange(1000, 1064)
    pool.store(a, 64, lambda s, e: kv_of(e - s))
    pool.store(b, 64, lambda s, e: kv_of(e - s, fill=10))
    assert pool.nbytes == 3 * block_bytes and len(pool.blocks) == 3
    # a's second block went first (a child before its parent): a's first block is still found
    assert pool.lookup(a, 63)[0] == 32 and pool.lookup(b, 63)[0] == 63
    n, kv = pool.lookup(b, 40)
    assert n == 40 and kv[1][0].shape == (1, 40, 4) and (kv[1][0] == 11).all()
    pool.store(np.arange(2000, 2032), 32, lambda s, e: kv_of(e - s))  # evicts a's block: the least recent
    assert pool.lookup(a, 63)[0] == 0 and pool.lookup(b, 63)[0] == 63
    assert pool.nbytes <= pool.max_bytes


def test_a_block_is_matched_by_its_tokens_not_only_its_name():
    pool = PrefixCache(max_bytes=1 << 20)
    a = np.arange(32)
    pool.store(a, 32, lambda s, e: kv_of(e - s))
    name = next(iter(pool.blocks))
    pool.blocks[name].tokens = pool.blocks[name].tokens + 1  # as a digest collision would look
    assert pool.lookup(a, 32)[0] == 0


def test_a_failure_to_keep_a_prefix_turns_reuse_off_and_serving_goes_on(models, monkeypatch, capsys):
    model, vocab = models["onnx"], models["onnx"].config.vocab_size
    engine = Engine(model, max_batch=2)

    def broken(slot, start, end):
        raise MemoryError("no room")

    monkeypatch.setattr(engine.slots, "read", broken)
    ids = prompt(50, vocab, seed=13)
    a = Run(ids)
    run(engine, a)
    assert a.finished.reason == "length" and a.tokens == alone(model, ids).tokens
    assert (engine.prefix.enabled, engine.prefix.nbytes) == (False, 0)
    assert capsys.readouterr().err == "prefix cache turned off: no room\n"

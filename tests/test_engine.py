"""Continuous batching (serving.engine): requests joining and leaving the running batch between steps give
exactly what each gives alone, on the ONNX Runtime model (one batched call per step over shared cache rows) and
on the Paddle model (a cache per request); cancellation, failures, the queue and shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from ernie_paddle.causal_lm import CausalLM
from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.serving.engine import Engine, Finished, QueueFull, Request, ShuttingDown, Token
from ernie_paddle.serving.slots import SeparateSlots, SharedSlots

from conftest import prompt

LENGTHS = (3, 40, 7, 25, 12, 60, 5, 18)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


class Recorder:
    """A request's events, as the engine emits them."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finished: Finished | None = None
        self.started = threading.Event()  # its first token is out: it is running
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.started.set()
        else:
            self.finished = event
            self.done.set()


def request(vocab: int, n: int, prompt_seed: int, new: int, **gen) -> tuple[Request, Recorder]:
    rec = Recorder()
    return Request(prompt(n, vocab, seed=prompt_seed), GenerationConfig(max_new_tokens=new, eos_token_ids=[], **gen),
                   rec), rec


def drive(engine: Engine, reqs: list[Request], every: int = 3) -> None:
    """Submit one request every `every` steps (a prompt arrives while others decode), then run to the end."""
    pending = list(reqs)
    while pending or not engine.idle():
        if pending and engine.steps % every == 0:
            engine.submit(pending.pop(0))
        engine.step()


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_both_models_provide_the_interface_the_engine_drives(models, kind):
    model = models[kind]
    assert isinstance(model, CausalLM)
    assert (model.chunked_prefill_max_batch, model.has_position_ids, model.shares_kv_buffer) == \
        {"onnx": (1, False, True), "paddle": (None, True, False)}[kind]


@pytest.mark.parametrize("kind", ["onnx", "paddle"])
def test_eight_staggered_requests_equal_each_alone(models, kind):
    model = models[kind]
    engine = Engine(model, max_batch=4)
    assert isinstance(engine.slots, SharedSlots if kind == "onnx" else SeparateSlots)
    vocab = model.config.vocab_size
    made = [request(vocab, n, prompt_seed=i, new=10 + 3 * i, prefill_chunk=8) for i, n in enumerate(LENGTHS)]
    drive(engine, [r for r, _ in made])
    for r, rec in made:
        assert rec.finished.reason == "length"
        assert rec.tokens == generate(model, r.prompt, r.gen)
    # the batch really ran: at most 4 rows, and fewer model steps than the requests one after another
    assert engine.steps < sum(10 + 3 * i for i in range(8))


def test_sampled_requests_are_seeded_per_request(models):
    model = models["onnx"]
    engine = Engine(model, max_batch=4)
    vocab = model.config.vocab_size
    made = [request(vocab, n, prompt_seed=i, new=12, do_sample=True, temperature=1.3, top_p=0.9, seed=100 + i,
                    prefill_chunk=16)
            for i, n in enumerate(LENGTHS[:5])]
    drive(engine, [r for r, _ in made], every=2)
    for r, rec in made:
        assert rec.tokens == generate(model, r.prompt, r.gen)


def test_cancel_frees_the_row_and_the_others_go_on(models):
    model = models["onnx"]
    engine = Engine(model, max_batch=2)
    vocab = model.config.vocab_size
    (a, ra), (b, rb), (c, rc) = (request(vocab, n, prompt_seed=s, new=30, prefill_chunk=64)
                                 for n, s in ((9, 1), (14, 2), (6, 3)))
    for r in (a, b, c):
        engine.submit(r)
    for _ in range(6):
        engine.step()
    assert engine.batch_size == 2 and engine.queue_depth == 1  # c waits for a row
    engine.cancel(a)
    engine.step()
    assert ra.finished.reason == "cancelled" and len(ra.tokens) < 30
    while not engine.idle():
        engine.step()
    assert rb.tokens == generate(model, b.prompt, b.gen) and rc.tokens == generate(model, c.prompt, c.gen)


def test_a_failing_request_fails_alone(models, monkeypatch):
    model = models["onnx"]
    engine = Engine(model, max_batch=3)
    vocab = model.config.vocab_size
    made = [request(vocab, n, prompt_seed=s, new=8, prefill_chunk=64) for n, s in ((5, 1), (11, 2), (7, 3))]
    bad = made[1][0]
    real_decode = engine.slots.decode

    def flaky(start, tokens, lengths):  # any model call holding the bad request's row fails after its 3rd token
        if bad.generated >= 3 and any(engine.running[start + i] is bad for i in range(len(tokens))):
            raise RuntimeError("injected failure\nsecond line")
        return real_decode(start, tokens, lengths)

    monkeypatch.setattr(engine.slots, "decode", flaky)
    drive(engine, [r for r, _ in made], every=1)
    (r0, rec0), (r1, rec1), (r2, rec2) = made
    assert rec1.finished == Finished("error", "injected failure") and len(rec1.tokens) == 3
    assert rec0.finished.reason == rec2.finished.reason == "length"
    assert rec0.tokens == generate(model, r0.prompt, r0.gen) and rec2.tokens == generate(model, r2.prompt, r2.gen)
    assert engine.idle()


def test_queue_limits_and_errors(models):
    model = models["onnx"]
    engine = Engine(model, max_batch=1, max_queue=2, max_len=64)
    vocab = model.config.vocab_size
    for s in range(2):
        engine.submit(request(vocab, 4, prompt_seed=s, new=4)[0])
    with pytest.raises(QueueFull, match=r"^the queue is full \(2 waiting requests\)$"):
        engine.submit(request(vocab, 4, prompt_seed=9, new=4)[0])
    with pytest.raises(InputError, match=r"^prompt of 60 tokens \+ max_tokens 8 = 68 exceeds the context of 64 "
                                         r"tokens$"):
        engine.submit(request(vocab, 60, prompt_seed=1, new=8)[0])
    with pytest.raises(InputError, match="token id 9999 at position 1 is out of range"):
        engine.submit(Request([5, 9999], GenerationConfig(max_new_tokens=2), lambda e: None))


def test_threaded_engine_serves_and_shuts_down(models):
    model = models["onnx"]
    engine = Engine(model, max_batch=4)
    engine.start()
    vocab = model.config.vocab_size
    made = [request(vocab, n, prompt_seed=i, new=16, prefill_chunk=16) for i, n in enumerate(LENGTHS[:6])]
    for r, _ in made:
        engine.submit(r)
        time.sleep(0.005)
    for r, rec in made:
        assert rec.done.wait(60)
        assert rec.tokens == generate(model, r.prompt, r.gen)
    long_req, long_rec = request(vocab, 8, prompt_seed=5, new=1500, prefill_chunk=16)
    engine.submit(long_req)
    assert long_rec.started.wait(60)  # running (however long a loaded machine took to start it), then shut down
    engine.shutdown(grace=0.2)  # too short for 1500 tokens: aborted, and nothing new is accepted
    assert long_rec.finished.reason == "aborted" and 0 < len(long_rec.tokens) < 1500
    with pytest.raises(ShuttingDown):
        engine.submit(request(vocab, 4, prompt_seed=1, new=2, prefill_chunk=16)[0])

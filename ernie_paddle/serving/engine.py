"""Continuous batching: requests join and leave the running decode batch between steps.

One thread runs the model. Each iteration it drops cancelled requests (freeing their rows at once), admits
waiting ones into free rows, runs one prefill slice of the request being prefilled, then one decode step for
every running request. Prefilling in slices between decode steps keeps a long prompt from stalling the streams:
while others decode, a slice is sized (from measured times) to cost a few decode steps.
Running requests occupy rows 0..n-1 of the cache (`slots`), so a decode step is one model call over them;
when one finishes, the last row moves into its place.

A request's tokens are chosen by the same `generation.Decoding` as `generation.stream` uses (its own sampling
settings, seeded generator, stop and length rule), and each row's numbers do not depend on the others, so its
output is that of running it alone.
Events reach the request's `emit` callback from the engine thread.

A new request first takes the longest prefix of its prompt that the prefix cache holds (`prefix_cache`: the keys and
values of earlier requests' prompts and answers, copied into its row) and prefills only the rest; the last prompt
token is always run, for its logits. What each prefill slice and each finished request computed is offered back.
A scored prompt (`echo` with `logprobs`) takes nothing from the cache: its slices compute and score every position
(`prompt_scoring`). A request for no new tokens (`max_tokens` 0, score only) ends once its prompt is prefilled.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ernie_paddle.causal_lm import CausalLM
from ernie_paddle.errors import ErnieError
from ernie_paddle.generation import Decoding, GenerationConfig, check_prompt
from ernie_paddle.scoring import log_softmax
from ernie_paddle.serving.prefix_cache import DEFAULT_PREFIX_CACHE_MEMORY, PrefixCache
from ernie_paddle.serving.prompt_scoring import score_slice
from ernie_paddle.serving.slots import Slots, slots_for


class QueueFull(ErnieError):
    """The engine's waiting queue is full (the server answers 429)."""


class ShuttingDown(ErnieError):
    """The engine accepts no new requests."""


@dataclass
class Token:
    """A generated token; `logprob` and `top` (the most likely (id, logprob) pairs) when the request asked."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """The last event of a request: reason is "stop", "length", "cancelled", "aborted" or "error"."""

    reason: str
    error: str | None = None


@dataclass
class EngineTotals:
    """Model time and tokens since start, by kind of step: decode throughput under load is tokens over seconds of
    decode steps alone, whatever prefill work was interleaved (exposed on /metrics)."""

    decode_seconds: float = 0.0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0


@dataclass(eq=False)
class Request:
    """A prompt to continue: `gen` decides the tokens (validated on submit); `emit` receives Token and Finished."""

    prompt: list[int]
    gen: GenerationConfig
    emit: Callable[[Token | Finished], None]
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    score_prompt: bool = False  # echo: score every prompt token (no prefix reuse; prompt_scoring)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    # engine state
    decoding: Decoding | None = None  # from the first prefill slice on
    filled: int = 0  # tokens in the cache
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    output: list[int] = field(default_factory=list)  # the tokens generated so far
    prompt_scores: list = field(default_factory=list)  # score_prompt: prompt_scoring.Score of tokens 1.. of the prompt
    next_token: int | None = None  # None once finished

    @property
    def generated(self) -> int:
        return self.decoding.generated if self.decoding else 0


_ids = itertools.count(1)


class Engine:
    """Schedules requests on a model with `max_batch` rows; a request's prompt is prefilled in slices of at most its
    own `gen.prefill_chunk` tokens. `prefix_cache_memory`: bytes of computed prefixes kept for later requests (0:
    none)."""

    def __init__(self, model: CausalLM, max_batch: int = 4, max_queue: int = 64, max_len: int | None = None,
                 slots: Slots | None = None, prefix_cache_memory: int = DEFAULT_PREFIX_CACHE_MEMORY):
        limit = model.config.max_position_embeddings
        self.model = model
        self.max_len = min(max_len or limit, limit)
        self.max_queue = max_queue
        self.slots = slots or slots_for(model, max_batch, self.max_len)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # rows 0..n-1, in order
        self.prefilling: Request | None = None
        self.prefill_slot = -1
        self.accepting = True
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        # seconds of a decode step and of one prefill token, as measured (moving averages): while requests decode,
        # a prefill slice is sized to cost a few decode steps, so a long prompt delays each stream's next token by
        # a few steps at a time instead of a whole chunk
        self.decode_seconds: float | None = None
        self.prefill_token_seconds: float | None = None
        self.totals = EngineTotals()
        self.prefix = PrefixCache(prefix_cache_memory)

    # ---- the caller's side ----------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise InputError naming what does not fit: the prompt and its new tokens must fit a row."""
        req.gen.validate()
        check_prompt(self.model, req.prompt, req.gen.max_new_tokens, self.max_len, budget="max_tokens")

    def submit(self, req: Request) -> None:
        """Queue `req` (checked first); raises QueueFull or ShuttingDown."""
        self.check(req)
        with self._lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self.waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """Stop `req` at the next step boundary; its row is freed then (its last event is Finished("cancelled"))."""
        with self._lock:
            req.cancelled = True
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def idle(self) -> bool:
        return not self.waiting and not self.running and self.prefilling is None

    def free_slots(self) -> int:
        return self.slots.capacity - self.batch_size

    # ---- the thread ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ernie-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self.idle():
                    self._wake.wait()
                if self._stop:
                    return
            self.step()

    def shutdown(self, grace: float) -> None:
        """Accept nothing more; let running and waiting requests finish for `grace` seconds, then abort the rest."""
        with self._lock:
            self.accepting = False
        end = time.monotonic() + grace
        while time.monotonic() < end and not self.idle():
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for req in list(self.waiting) + self.running + ([self.prefilling] if self.prefilling else []):
            req.emit(Finished("aborted", "the server shut down before the request finished"))
        self.waiting.clear()
        self.running.clear()
        self.prefilling = None

    # ---- one iteration ---------------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled requests, admit one waiting request, run one prefill chunk and one decode step."""
        self._drop_cancelled()
        with self._lock:
            if self.prefilling is None and self.waiting and self.free_slots() > 0:
                self.prefilling = self.waiting.popleft()
                self.prefill_slot = len(self.running)
        if self.prefilling is not None:
            self._prefill_chunk()
        if self.running:
            self._decode()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            r.emit(Finished("cancelled"))
        if self.prefilling is not None and self.prefilling.cancelled:
            self._end_prefill(Finished("cancelled"))
        for r in [r for r in self.running if r.cancelled]:
            self._leave(r, Finished("cancelled"))

    def _prefill_chunk(self) -> None:
        req, slot = self.prefilling, self.prefill_slot
        try:
            if req.decoding is None:
                req.decoding = Decoding(np.asarray(req.prompt, np.int64), req.gen, self.model.config.eos_token_ids)
                if not req.score_prompt:  # a scored prompt computes every position
                    self._reuse_prefix(req)
            chunk = req.decoding.history[req.filled:req.filled + self._prefill_size(req.gen.prefill_chunk)]
            t0 = time.perf_counter()
            if req.score_prompt:  # every position's logits [T, V]
                logits = self.slots.prefill(slot, chunk, req.filled, every=True)
                req.prompt_scores += score_slice(req.prompt, req.filled, logits, req.logprobs or 0)
                logits = logits[-1]
            else:
                logits = self.slots.prefill(slot, chunk, req.filled)
        except Exception as e:  # noqa: BLE001 - a failure inside the model fails this request alone
            self._end_prefill(Finished("error", _describe(e)))
            return
        spent = time.perf_counter() - t0
        self.prefill_token_seconds = _average(self.prefill_token_seconds, spent / len(chunk))
        self.totals.prefill_seconds += spent
        self.totals.prefill_tokens += len(chunk)
        req.filled += len(chunk)
        self._offer(req, slot, req.prompt)
        if req.filled < len(req.prompt):
            return
        if req.gen.max_new_tokens == 0:  # score only (echo with max_tokens 0): nothing to generate
            self._end_prefill(Finished("length"))
            return
        self.prefilling = None
        row = len(self.running)
        if self.prefill_slot != row:  # a running request left meanwhile: move into the first free row
            self.slots.move(self.prefill_slot, row, req.filled)
        self.running.append(req)
        self._emit_token(req, logits)
        if req.next_token is None:
            self._leave(req, None)

    def _reuse_prefix(self, req: Request) -> None:
        """Copy the longest cached prefix of the prompt (all but its last token at most) into the request's row."""
        n, kv = self.prefix.lookup(req.prompt, len(req.prompt) - 1)
        if n:
            self.slots.write(self.prefill_slot, 0, kv)
            req.filled = req.cached_tokens = n

    def _offer(self, req: Request, slot: int, tokens: list[int]) -> None:
        """Give the prefix cache the computed part of `tokens` (the request's first `filled`) from row `slot`. Reuse
        only saves work: if keeping a prefix fails, the pool is emptied and turned off, and serving goes on."""
        try:
            self.prefix.store(tokens, min(req.filled, len(tokens)), lambda s, e: self.slots.read(slot, s, e))
        except Exception as e:  # noqa: BLE001 - never the engine thread's end
            print(f"prefix cache turned off: {_describe(e)}", file=sys.stderr, flush=True)
            self.prefix.clear()
            self.prefix.max_bytes = 0

    def _prefill_size(self, chunk: int) -> int:
        """Prompt tokens for this step: the whole `chunk` when nothing decodes, else about SLICE_STEPS decode steps'
        worth (at least MIN_SLICE tokens, which keep the matrix products efficient)."""
        if not self.running or not self.decode_seconds or not self.prefill_token_seconds:
            return chunk
        fits = int(SLICE_STEPS * self.decode_seconds / self.prefill_token_seconds)
        return max(min(MIN_SLICE, chunk), min(chunk, fits))

    def _end_prefill(self, event: Finished) -> None:
        req, self.prefilling = self.prefilling, None
        self.slots.release(self.prefill_slot)
        req.emit(event)

    def _decode(self) -> None:
        reqs = list(self.running)
        tokens = np.array([r.next_token for r in reqs], np.int64)
        lengths = np.array([r.filled for r in reqs], np.int64)
        t0 = time.perf_counter()
        try:
            rows = list(self.slots.decode(0, tokens, lengths))
            spent = time.perf_counter() - t0
            self.decode_seconds = _average(self.decode_seconds, spent)
            self.totals.decode_seconds += spent
            self.totals.decode_tokens += len(reqs)
        except Exception:  # noqa: BLE001 - find the failing request: each row again on its own
            rows = []
            for i, r in enumerate(reqs):
                try:
                    rows.append(self.slots.decode(i, tokens[i:i + 1], lengths[i:i + 1])[0])
                except Exception as e:  # noqa: BLE001
                    rows.append(e)
        failed = []
        for r, logits in zip(reqs, rows):
            if isinstance(logits, Exception):
                failed.append((r, Finished("error", _describe(logits))))
            else:
                r.filled += 1
                self._emit_token(r, logits)
        # rows leave only once every row's length is final: a row that moves takes all its cached tokens
        for r, event in failed:
            self._leave(r, event)
        for r in [r for r in self.running if r.next_token is None]:
            self._leave(r, None)

    def _emit_token(self, req: Request, logits: np.ndarray) -> None:
        """Choose the request's next token from its logits [V] and emit it; `next_token` is None once finished."""
        token = req.decoding.choose(logits)
        ended = req.decoding.accept(token)
        event = Token(token)
        if req.logprobs is not None:
            event.logprob, event.top = _logprobs(logits, token, req.logprobs)
        req.emit(event)
        req.output.append(token)
        req.next_token = None if ended else token

    def _leave(self, req: Request, event: Finished | None) -> None:
        """Free `req`'s row; the last running row moves into it, so rows 0..n-1 stay the running ones."""
        i = self.running.index(req)
        last = len(self.running) - 1
        if event is None or event.reason == "cancelled":  # (after a failure its row is not trusted)
            self._offer(req, i, req.prompt + req.output)
        if i != last:
            moved = self.running[last]
            self.slots.move(last, i, moved.filled)
            self.running[i] = moved
        self.running.pop()
        self.slots.release(last)
        req.emit(event or Finished(req.decoding.finish))


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's distribution, and the k most likely tokens."""
    logp = log_softmax(logits)
    top = np.argsort(-logp, kind="stable")[:k] if k else []
    return float(logp[token]), [(int(i), float(logp[i])) for i in top]


MIN_SLICE = 64  # the smallest prefill slice taken between decode steps (smaller ones waste per-call time)
SLICE_STEPS = 4  # a prefill slice between decode steps costs about this many decode steps


def _average(mean: float | None, x: float, weight: float = 0.2) -> float:
    """An exponential moving average (the first value as is)."""
    return x if mean is None else (1 - weight) * mean + weight * x


def _describe(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__

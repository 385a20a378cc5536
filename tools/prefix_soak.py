"""Soak prefix reuse under load: conversations that share system prompts and documents, sent by concurrent clients
to `ernie-onnx serve` with a small `--prefix-cache-memory` (a few conversations' worth, so blocks are evicted all
the time). About one request in ten is streamed and dropped by its client before or at its first event (a long
prompt, a disconnect in mid-prefill), then sent again whole. Every completed answer is then asked of a second server
on the same folder with reuse off (`--prefix-cache-memory 0`), and must be the same text.

Checked, each a row of the summary: the answers; `ernie_prefix_cache_bytes` never above
`ernie_prefix_cache_max_bytes` (polled from /metrics during the run); reuse happened (hits > 0); eviction happened
(the bytes reached the bound, and a probe prompt cached before the load is no longer cached after it); nothing
running or waiting at the end; the server's resident memory grew by at most `--rss-margin` after warm-up.
The preset's fp32 export is served by default: on the int4 one a request's tokens depend on the rows decoded beside
it, reuse or not, so two servers' answers can differ without reuse being at fault. A program, not a test; it exits
1 when a check fails:

    python -m ernie_paddle.tools.prefix_soak --preset shipped --requests 500 --json docs/prefix-soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ernie_paddle.atomic import write_json
from ernie_paddle.benchmarking import servers
from ernie_paddle.cli.args import non_negative_int, positive_int, size
from ernie_paddle.interrupts import run_command

DROP_RATE = 0.1  # of requests: streamed and dropped by the client, before or at the first event
STREAM_RATE = 0.25  # of the completed requests: streamed (the rest are whole answers)
BOUND_REACHED = 0.9  # the pool's peak bytes over its bound that shows it filled (a block is under a tenth of it)
WARM_UP = 0.1  # of the requests, after which (and once the pool has filled) resident memory must stay flat


# ---- the conversations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Lengths in words of the shared texts and of each turn, and how long a conversation runs."""

    system_words: tuple[int, int] = (40, 80)
    document_words: tuple[int, int] = (150, 300)
    question_words: tuple[int, int] = (8, 30)
    paste_words: tuple[int, int] = (250, 400)  # pasted into a dropped turn: a long prompt to cut in mid-prefill
    turns: tuple[int, int] = (2, 8)
    systems: int = 2
    documents: int = 3


SMALL = Sizes(system_words=(15, 30), document_words=(50, 90), question_words=(5, 15), paste_words=(100, 160),
              turns=(2, 5))  # the test's: short prompts, the same shape of sharing


@dataclass(frozen=True)
class Ask:
    """One request: its endpoint ("completions" or "chat/completions") and its body (greedy, without "stream")."""

    endpoint: str
    body: dict
    conversation: int
    turn: int


@dataclass
class Answer:
    """What a server answered: the text (a chat message's parts as JSON), the finish reason and the usage."""

    text: str
    finish: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None


class Conversation:
    """Conversation `index`: a system prompt and maybe a document from the shared ones, then questions, each turn
    resending the history with the previous answers; `kind` is "chat" (messages) or "completion" (one text). Its
    texts depend only on the seed and its index, whatever the timing."""

    def __init__(self, workload: Workload, index: int):
        rng = random.Random(workload.seed * 1_000_003 + index)
        self.workload, self.index = workload, index
        self.kind = "chat" if index % 2 == 0 else "completion"
        sizes = workload.sizes
        head = rng.choice(workload.systems)
        if rng.random() < 0.75:
            head += "\n\n" + rng.choice(workload.documents)
        self.head = head
        self.turns = []  # (user text, dropped first?)
        drop = workload.drop_rate / (1 - workload.drop_rate)  # a dropped turn is two requests: the drop and its retry
        for _ in range(rng.randint(*sizes.turns)):
            dropped = rng.random() < drop
            text = workload.passage(rng, sizes.question_words)
            if dropped:
                text += "\n\n" + workload.passage(rng, sizes.paste_words)
            self.turns.append((text, dropped))

    def ask(self, turn: int, history: list[tuple[str, str]]) -> Ask:
        """Turn `turn`'s request after the (question, answer) pairs of `history`."""
        user = self.turns[turn][0]
        base = {"model": self.workload.model, "max_tokens": self.workload.max_tokens, "temperature": 0}
        if self.kind == "chat":
            messages = [{"role": "system", "content": self.head}]
            for q, a in history:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            body = {**base, "messages": messages + [{"role": "user", "content": user}]}
            return Ask("chat/completions", body, self.index, turn)
        text = self.head + "\n\n" + "".join(f"Q: {q}\nA:{a}\n\n" for q, a in history) + f"Q: {user}\nA:"
        return Ask("completions", {**base, "prompt": text}, self.index, turn)


class Workload:
    """The shared texts (system prompts and documents cut from the held-out corpus) and the requests' settings;
    `count(text)` gives a text's tokens, so a conversation ends before its prompt would not fit `max_len`."""

    def __init__(self, model: str, count: Callable[[str], int], max_len: int, sizes: Sizes = Sizes(),
                 max_tokens: int = 16, seed: int = 0, drop_rate: float = DROP_RATE):
        from ernie_paddle.corpus import held_out_text

        self.model, self.count, self.max_len, self.sizes = model, count, max_len, sizes
        self.max_tokens, self.seed, self.drop_rate = max_tokens, seed, drop_rate
        self.words = held_out_text().split()
        rng = random.Random(seed)
        self.systems = [self.passage(rng, sizes.system_words) for _ in range(sizes.systems)]
        self.documents = [self.passage(rng, sizes.document_words) for _ in range(sizes.documents)]

    def passage(self, rng: random.Random, words: tuple[int, int]) -> str:
        k = rng.randint(*words)
        s = rng.randrange(0, len(self.words) - k)
        return " ".join(self.words[s:s + k])

    def fits_first(self, conv: Conversation) -> bool:
        """Whether the conversation's first turn fits the context (16 tokens allowed for the chat markers)."""
        return self.count(conv.head) + self.count(conv.turns[0][0]) + 16 + self.max_tokens <= self.max_len

    def fits(self, answer: Answer, next_user: str) -> bool:
        """Whether the turn after `answer` (its prompt: this one, the answer and `next_user`) fits the context,
        allowing 16 tokens for the chat template's markers."""
        need = answer.prompt_tokens + answer.completion_tokens + self.count(next_user) + 16 + self.max_tokens
        return need <= self.max_len


# ---- one request ------------------------------------------------------------------------------------------------
class RequestFailed(Exception):
    """A server answered a request with an error (or not at all)."""


def _answer(ask: Ask, choice: dict, usage: dict | None) -> Answer:
    if ask.endpoint == "completions":
        text = choice.get("text", "")
    else:
        m = choice.get("message", {})
        calls = [c["function"] for c in m.get("tool_calls") or []]  # not their ids: those are random
        text = json.dumps([m.get("content"), m.get("reasoning_content"), calls], ensure_ascii=False)
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Answer(text, choice.get("finish_reason"), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                  details.get("cached_tokens"))


async def whole(client, url: str, ask: Ask) -> Answer:
    """The answer as one JSON object."""
    r = await client.post(f"{url}/v1/{ask.endpoint}", json=ask.body)
    if r.status_code != 200:
        raise RequestFailed(f"HTTP {r.status_code}: {r.text[:200]}")
    out = r.json()
    return _answer(ask, out["choices"][0], out.get("usage"))


async def streamed(client, url: str, ask: Ask) -> Answer:
    """The answer as server-sent events (with the usage chunk), put together as the whole answer would be."""
    body = {**ask.body, "stream": True, "stream_options": {"include_usage": True}}
    text, content, reasoning, calls, finish, usage = [], [], [], [], None, None
    async with client.stream("POST", f"{url}/v1/{ask.endpoint}", json=body) as r:
        if r.status_code != 200:
            raise RequestFailed(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RequestFailed(f"in the stream: {chunk['error'].get('message')}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta", {})
                text.append(choice.get("text") or "")
                content.append(delta.get("content") or "")
                reasoning.append(delta.get("reasoning_content") or "")
                calls += [c["function"] for c in delta.get("tool_calls") or []]
    if ask.endpoint == "completions":
        choice = {"text": "".join(text), "finish_reason": finish}
    else:
        message = {"content": "".join(content) or (None if calls else ""), "reasoning_content": "".join(reasoning)
                   or None, "tool_calls": [{"function": c} for c in calls]}
        choice = {"message": message, "finish_reason": finish}
    return _answer(ask, choice, usage)


async def dropped(client, url: str, ask: Ask, delay: float) -> bool:
    """Stream `ask` and close the connection at its first event or after `delay` seconds, whichever is first;
    whether an event had arrived (a chat stream's first event, its role, comes before the prefill)."""
    got = []

    async def read() -> None:
        async with client.stream("POST", f"{url}/v1/{ask.endpoint}", json={**ask.body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    got.append(line)
                    return  # leaving the block closes the connection

    try:
        await asyncio.wait_for(read(), delay)
    except asyncio.TimeoutError:
        pass
    return bool(got)


# ---- the server's side -------------------------------------------------------------------------------------------
METRICS = ("ernie_prefix_cache_bytes", "ernie_prefix_cache_max_bytes", "ernie_prefix_cache_hits",
           "ernie_prefix_cache_queries", "ernie_num_requests_running", "ernie_num_requests_waiting",
           "ernie_engine_prefill_tokens", "ernie_engine_decode_tokens")


def parse_metrics(text: str, url: str = "the server") -> dict[str, float]:
    """METRICS from a Prometheus exposition (a counter's `_total` sample under its own name); a missing one is an
    error naming it: the server predates prefix reuse."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+?)(?:_total)? (\S+)$", line)
        if m and m.group(1) in METRICS:
            found[m.group(1)] = float(m.group(2))
    missing = [k for k in METRICS if k not in found]
    if missing:
        raise RuntimeError(f"{url}/metrics has no {', '.join(missing)}: the server does not report prefix reuse")
    return found


async def metrics(client, url: str) -> dict[str, float]:
    return parse_metrics((await client.get(f"{url}/metrics")).text, url)


@dataclass
class Server:
    """A running server: its base URL and its process id (for its resident memory)."""

    url: str
    pid: int


# ---- the soak ------------------------------------------------------------------------------------------------
@dataclass
class Record:
    ask: Ask
    answer: Answer
    streamed: bool
    after_drop: bool = False  # sent again after its client dropped the same request
    reference: Answer | None = None


@dataclass
class Run:
    """What the load did: the answers, the drops, the failures and the samples of the server's gauges."""

    records: list[Record] = field(default_factory=list)
    drops_before_event: int = 0
    drops_at_event: int = 0
    failures: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    sent: int = 0
    conversations: int = 0


async def _load(client, server: Server, workload: Workload, n: int, concurrency: int, run: Run) -> None:
    """`concurrency` clients, each holding conversations one after another until `n` requests have been sent."""
    next_conversation = iter(range(1 << 30))

    def take(k: int) -> int:
        k = min(k, n - run.sent)
        run.sent += k
        return k

    async def client_loop(c: int) -> None:
        rng = random.Random(workload.seed * 7919 + c)
        misfits = 0
        while run.sent < n:
            conv = Conversation(workload, next(next_conversation))
            if not workload.fits_first(conv):
                misfits += 1
                if misfits > 100:
                    raise RuntimeError(f"the conversations' first turns do not fit the context of {workload.max_len} "
                                       "tokens: a server with a longer --max-model-len, or --small")
                continue
            misfits = 0
            run.conversations += 1
            history: list[tuple[str, str]] = []
            for t, (user, drop) in enumerate(conv.turns):
                k = take(2 if drop else 1)
                if not k:
                    return
                ask = conv.ask(t, history)
                if k == 2:
                    if await dropped(client, server.url, ask, rng.uniform(0.01, 0.3)):
                        run.drops_at_event += 1
                    else:
                        run.drops_before_event += 1
                stream = rng.random() < STREAM_RATE
                try:
                    answer = await (streamed if stream else whole)(client, server.url, ask)
                except RequestFailed as e:
                    run.failures.append(f"conversation {conv.index} turn {t}: {e}")
                    break
                run.records.append(Record(ask, answer, stream, after_drop=k == 2))
                history.append((user, answer.text if conv.kind == "completion" else json.loads(answer.text)[0] or ""))
                if t + 1 < len(conv.turns) and not workload.fits(answer, conv.turns[t + 1][0]):
                    break

    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))


async def _poll(client, server: Server, run: Run, stop: asyncio.Event, interval: float) -> None:
    """Sample the server's gauges and resident memory every `interval` seconds until `stop`."""
    t0 = time.monotonic()
    while True:
        m = await metrics(client, server.url)
        run.samples.append({"t": round(time.monotonic() - t0, 2), "sent": run.sent,
                            "rss_kib": servers.rss_kib(server.pid), **m})
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except asyncio.TimeoutError:
            pass


async def _probe(client, server: Server, ask: Ask) -> tuple[Answer, int]:
    """Ask alone, on an idle server: the answer and the prompt tokens the prefix cache gave it (/metrics' hits)."""
    before = (await metrics(client, server.url))["ernie_prefix_cache_hits"]
    answer = await whole(client, server.url, ask)
    return answer, int((await metrics(client, server.url))["ernie_prefix_cache_hits"] - before)


async def _settled(client, server: Server, seconds: float = 60.0) -> dict[str, float]:
    """The server's gauges once nothing runs or waits (or after `seconds`: what was still in use)."""
    end = time.monotonic() + seconds
    while True:
        m = await metrics(client, server.url)
        if (m["ernie_num_requests_running"] == 0 and m["ernie_num_requests_waiting"] == 0) or \
                time.monotonic() > end:
            return m
        await asyncio.sleep(0.1)


async def soak(reused: Server, reference: Server, workload: Workload, n: int, concurrency: int,
               rss_margin: int, poll_interval: float = 0.25) -> dict:
    """The soak: a probe, the load on `reused`, the probe again, then every completed request on `reference`.
    Returns the report: counts, the checks (each {"ok", "value", "limit"}) and the samples."""
    import httpx

    run = Run()
    probe_rng = random.Random(workload.seed + 99)
    probe = Ask("completions", {"model": workload.model, "prompt": "PROBE. " + workload.passage(
        probe_rng, workload.sizes.document_words), "max_tokens": workload.max_tokens, "temperature": 0}, -1, 0)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        start = await metrics(client, reused.url)
        first, _ = await _probe(client, reused, probe)
        again, probe_cached_before = await _probe(client, reused, probe)
        stop = asyncio.Event()
        poller = asyncio.ensure_future(_poll(client, reused, run, stop, poll_interval))
        try:
            await _load(client, reused, workload, n, concurrency, run)
        finally:
            stop.set()
            await poller
        load_s = time.perf_counter() - t0
        settled = await _settled(client, reused)
        run.samples.append({"t": None, "sent": run.sent, "rss_kib": servers.rss_kib(reused.pid), **settled})
        last, probe_cached_after = await _probe(client, reused, probe)
        end = await _settled(client, reused)  # every request counted, the probe's last included
        run.samples.append({"t": None, "sent": run.sent, "rss_kib": servers.rss_kib(reused.pid), **end})
        run.records += [Record(probe, a, False) for a in (first, again, last)]
        # the reference: every completed request again, as many at a time, on the server without reuse
        gate = asyncio.Semaphore(concurrency)

        async def refer(rec: Record) -> None:
            async with gate:
                try:
                    rec.reference = await whole(client, reference.url, rec.ask)
                except RequestFailed as e:
                    run.failures.append(f"reference, conversation {rec.ask.conversation} turn {rec.ask.turn}: {e}")

        await asyncio.gather(*(refer(r) for r in run.records))
        ref_end = await _settled(client, reference)
    return report(run, start, end, ref_end, probe_cached_before, probe_cached_after, n, rss_margin,
                  load_s, time.perf_counter() - t0)


def _warm_sample(samples: list[dict], n: int, bound: float) -> dict:
    """The first sample after WARM_UP of the requests at which the pool had filled (else the first after WARM_UP)."""
    late = [s for s in samples if s["sent"] >= WARM_UP * n] or samples[-1:]
    return next((s for s in late if s["ernie_prefix_cache_bytes"] >= BOUND_REACHED * bound), late[0])


def report(run: Run, start: dict, end: dict, ref_end: dict, probe_before: int, probe_after: int, n: int,
           rss_margin: int, load_s: float, total_s: float) -> dict:
    """The counts and the checks of a soak (each check {"ok", "value", "limit"}), from what it recorded."""
    compared = [r for r in run.records if r.reference is not None]
    differ = [r for r in compared if (r.answer.text, r.answer.finish) != (r.reference.text, r.reference.finish)]
    bound = end["ernie_prefix_cache_max_bytes"]
    peak = max(s["ernie_prefix_cache_bytes"] for s in run.samples)
    warm = _warm_sample(run.samples, n, bound)
    growth = run.samples[-1]["rss_kib"] - warm["rss_kib"]
    hits = end["ernie_prefix_cache_hits"] - start["ernie_prefix_cache_hits"]
    queries = end["ernie_prefix_cache_queries"] - start["ernie_prefix_cache_queries"]
    cached = [r.answer.cached_tokens for r in run.records if r.answer.cached_tokens is not None]
    # decode steps the engine ran for dropped requests: a completed answer's tokens but its first came from decode
    decoded = end["ernie_engine_decode_tokens"] - start["ernie_engine_decode_tokens"]
    dropped_decode = int(decoded - sum(max(0, r.answer.completion_tokens - 1) for r in run.records))
    dropped_prefill = None  # prompt tokens the engine computed for dropped requests (it reports each answer's cached)
    if len(cached) == len(run.records):
        prefilled = end["ernie_engine_prefill_tokens"] - start["ernie_engine_prefill_tokens"]
        dropped_prefill = int(prefilled - sum(r.answer.prompt_tokens - r.answer.cached_tokens for r in run.records))
    mib = 1 << 20
    checks = {
        "answers equal the reference's": {
            "ok": not differ and not run.failures and len(compared) == len(run.records),
            "value": f"{len(compared) - len(differ)} of {len(run.records)} equal, {len(run.failures)} failed",
            "limit": "all equal, none failed"},
        "pool bytes within the bound": {
            "ok": peak <= bound and len(run.samples) > 1,
            "value": f"peak {peak / mib:.2f} MiB over {len(run.samples)} samples",
            "limit": f"<= {bound / mib:.2f} MiB"},
        "prefixes reused": {
            "ok": hits > 0, "value": f"{int(hits)} of {int(queries)} prompt tokens", "limit": "> 0"},
        "blocks evicted": {
            "ok": peak >= BOUND_REACHED * bound and probe_before > 0 and probe_after < probe_before,
            "value": f"peak {peak / bound:.0%} of the bound; probe cached {probe_before} tokens before the load, "
                     f"{probe_after} after",
            "limit": f"peak >= {BOUND_REACHED:.0%}, probe no longer cached"},
        "nothing left in use": {
            "ok": all(m["ernie_num_requests_running"] == 0 and m["ernie_num_requests_waiting"] == 0
                      for m in (end, ref_end)),
            "value": f"running {end['ernie_num_requests_running']:.0f}, waiting {end['ernie_num_requests_waiting']:.0f}"
                     f" (reference: {ref_end['ernie_num_requests_running']:.0f}, "
                     f"{ref_end['ernie_num_requests_waiting']:.0f})",
            "limit": "0"},
        "resident memory flat after warm-up": {
            "ok": growth * 1024 <= rss_margin,
            "value": f"{warm['rss_kib'] / 1024:.1f} -> {run.samples[-1]['rss_kib'] / 1024:.1f} MiB",
            "limit": f"+{rss_margin / mib:.0f} MiB"},
    }
    return {"requests": run.sent, "conversations": run.conversations, "completed": len(run.records),
            "compared": len(compared), "different": len(differ),
            "differences": [{"conversation": r.ask.conversation, "turn": r.ask.turn, "answer": r.answer.text,
                             "reference": r.reference.text} for r in differ[:5]],
            "failures": run.failures[:5], "streamed": sum(r.streamed for r in run.records),
            "drops_before_first_event": run.drops_before_event, "drops_at_first_event": run.drops_at_event,
            "prefix_cache_max_bytes": bound, "peak_bytes": peak, "hit_tokens": hits, "queried_tokens": queries,
            "cached_tokens_reported": sum(cached) if cached else None,
            "dropped_prompt_tokens": sum(r.answer.prompt_tokens for r in run.records if r.after_drop),
            "dropped_prefill_tokens": dropped_prefill, "dropped_decode_tokens": dropped_decode,
            "probe_cached_before": probe_before, "probe_cached_after": probe_after,
            "rss_warm_mib": round(warm["rss_kib"] / 1024, 1),
            "rss_end_mib": round(run.samples[-1]["rss_kib"] / 1024, 1),
            "load_s": round(load_s, 1), "total_s": round(total_s, 1), "checks": checks,
            "samples": run.samples[::max(1, len(run.samples) // 200)]}


def table(rep: dict) -> str:
    """The checks, one row each."""
    lines = ["check | value | limit | ok", "--- | --- | --- | ---"]
    lines += [f"{name} | {c['value']} | {c['limit']} | {'yes' if c['ok'] else 'NO'}"
              for name, c in rep["checks"].items()]
    return "\n".join(lines)


def summary(rep: dict) -> str:
    """What the load was, in one paragraph."""
    drops = rep["drops_before_first_event"] + rep["drops_at_first_event"]
    prefill = "" if rep["dropped_prefill_tokens"] is None else \
        f"{rep['dropped_prefill_tokens']} of their {rep['dropped_prompt_tokens']} prompt tokens prefilled, "
    return (f"{rep['requests']} requests in {rep['conversations']} conversations: {rep['completed']} completed "
            f"({rep['streamed']} streamed; 3 are the probe's), {drops} dropped ({rep['drops_before_first_event']} "
            f"before their first event; {prefill}{rep['dropped_decode_tokens']} tokens decoded for them); prefix hits "
            f"{rep['hit_tokens']:.0f} of {rep['queried_tokens']:.0f} prompt tokens; load {rep['load_s']} s, "
            f"all {rep['total_s']} s")


def passed(rep: dict) -> bool:
    return all(c["ok"] for c in rep["checks"].values())


# ---- the program ------------------------------------------------------------------------------------------------
MAX_LEN = 2048  # the servers' --max-model-len: the shipped model's context (mid's is longer than needed)


def start_servers(folder: str, threads: int, max_batch: int, memory: int, logs: str) -> list[tuple[Server, object]]:
    """Two servers on `folder`: one reusing prefixes in `memory` bytes, one with reuse off (the reference); their
    stderr (a line a request) goes to files in `logs`."""
    started = []
    try:
        for m in (memory, 0):
            port = servers.free_port()
            proc = servers.start(servers.ours_cmd(folder, port, threads, max_batch, MAX_LEN) +
                                 ["--prefix-cache-memory", str(m)], port,
                                 stderr_file=os.path.join(logs, f"serve-{m}.log"))
            started.append((Server(f"http://127.0.0.1:{port}", proc.pid), proc))
    except BaseException:
        for _, proc in started:
            servers.stop(proc)
        raise
    return started


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prefix_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shipped", choices=["shipped", "mid"], help="the model (bench's presets)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int4"],
                   help="the preset's export (default fp32: its batched rows give the tokens each gives alone; the "
                        "int4 export's do not, with reuse or without)")
    p.add_argument("--model", default=None, help="an exported folder to serve instead of the preset's")
    p.add_argument("--work", default=None, help="folder for the preset's export (reused)")
    p.add_argument("--requests", type=positive_int, default=500)
    p.add_argument("--concurrency", type=positive_int, default=6, help="clients at a time")
    p.add_argument("--max-batch", type=positive_int, default=4, help="the servers' --max-batch")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="answer length (greedy)")
    p.add_argument("--prefix-cache-memory", type=size, default=size("24MiB"),
                   help="the reusing server's bound (default 24MiB: a few of the shipped model's conversations)")
    p.add_argument("--small", action="store_true", help="shorter system prompts, documents and turns (the test's)")
    p.add_argument("--rss-margin", type=size, default=size("32MiB"),
                   help="how much the reusing server's resident memory may grow after warm-up")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def workload_for(server: Server, folder: str, sizes: Sizes = Sizes(), max_tokens: int = 16,
                 seed: int = 0) -> Workload:
    """The conversations for `server` (serving `folder`): its model name and context, the folder's tokenizer."""
    import httpx

    from ernie_paddle.text.tokenizer import ErnieTokenizer

    served = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    tok = ErnieTokenizer(folder)
    return Workload(served["id"], lambda t: len(tok.encode(t)), served["max_model_len"], sizes, max_tokens, seed)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from ernie_paddle import sysinfo
    from ernie_paddle.benchmarking.setups import prepare

    folder = args.model
    if folder is None:
        work = args.work or os.path.join(os.getcwd(), f"prefix-soak-{args.preset}")
        engine = f"ort-{args.precision}"
        paths, refused, _ = prepare(args.preset, work, [engine], args.seed, None, tokenizer_from_shipped=True)
        if refused:
            raise RuntimeError(f"cannot prepare: {refused}")
        folder = paths[engine]
    with tempfile.TemporaryDirectory(prefix="prefix-soak-") as logs:
        started = start_servers(folder, args.threads, args.max_batch, args.prefix_cache_memory, logs)
        try:
            (reused, _), (reference, _) = started
            workload = workload_for(reused, folder, SMALL if args.small else Sizes(), args.max_tokens, args.seed)
            rep = asyncio.run(soak(reused, reference, workload, args.requests, args.concurrency, args.rss_margin))
        finally:
            for _, proc in started:
                servers.stop(proc)
    name = os.path.basename(os.path.normpath(args.model)) if args.model else f"{args.preset} ort-{args.precision}"
    rep = {"model": name,
           "cpu": sysinfo.cpu_model(), "cpu_isa": sysinfo.cpu_isa(), "threads": args.threads,
           "concurrency": args.concurrency, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
           "rss_margin": args.rss_margin, "sizes": "small" if args.small else "full", **rep}
    print(table(rep))
    print(summary(rep))
    if args.json:
        write_json(args.json, rep)
    return 0 if passed(rep) else 1


if __name__ == "__main__":
    sys.exit(run_command(main, "prefix_soak"))

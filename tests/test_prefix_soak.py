"""tools/prefix_soak: the soak program on the shipped model (two `ernie-onnx serve` processes on one export, 60
requests of its shorter conversations, a bound of 6 MiB: about six of them) passes every check with the figures
it reports, and each check fails on the case it is there to catch."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ernie_paddle.cli.args import default_model_dir
from ernie_paddle.export import pipeline
from ernie_paddle.tools import prefix_soak as soak

N = 60


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("soak") / "shakespeare-onnx")
    pipeline.export(default_model_dir(), out, flavor="ort", precision="fp32", verify=False)
    return out


def test_the_soak_passes_on_the_shipped_model(folder, tmp_path, capsys):
    out = str(tmp_path / "soak.json")
    status = soak.main(["--model", folder, "--requests", str(N), "--small", "--prefix-cache-memory", "6MiB",
                        "--threads", "1", "--json", out])
    rep = json.load(open(out))
    assert status == 0, soak.table(rep)
    assert soak.table(rep) in capsys.readouterr().out
    drops = rep["drops_before_first_event"] + rep["drops_at_first_event"]
    assert rep["requests"] == N and drops >= 1
    # every request not dropped completed (each drop is followed by the same request whole), plus the probe's 3
    assert rep["completed"] == N - drops + 3 and rep["compared"] == rep["completed"]
    assert rep["different"] == 0 and rep["failures"] == []
    assert rep["prefix_cache_max_bytes"] == 6 << 20
    assert 0.9 * (6 << 20) <= rep["peak_bytes"] <= 6 << 20
    assert rep["hit_tokens"] > 0 and rep["probe_cached_before"] > 0 and rep["probe_cached_after"] == 0
    assert all(s["ernie_prefix_cache_bytes"] <= s["ernie_prefix_cache_max_bytes"] for s in rep["samples"])
    if rep["dropped_prefill_tokens"] is not None:  # the server reports each answer's cached tokens
        assert 0 <= rep["dropped_prefill_tokens"] <= rep["dropped_prompt_tokens"]


# ---- the checks catch what they are for ---------------------------------------------------------------------------
BOUND = 1 << 20


def gauges(**changes) -> dict:
    base = {"ernie_prefix_cache_bytes": BOUND, "ernie_prefix_cache_max_bytes": BOUND, "ernie_prefix_cache_hits": 64,
            "ernie_prefix_cache_queries": 200, "ernie_num_requests_running": 0, "ernie_num_requests_waiting": 0,
            "ernie_engine_prefill_tokens": 150, "ernie_engine_decode_tokens": 40}
    return {**base, **changes}


def passing() -> dict:
    """The arguments of `report` for a soak of 10 requests that passes: two answers equal to the reference's."""
    ask = soak.Ask("completions", {"prompt": "x"}, 0, 0)
    answer = soak.Answer("the same", "length", 100, 16, 32)
    run = soak.Run(records=[soak.Record(ask, answer, False, reference=dataclasses.replace(answer, cached_tokens=0))
                            for _ in range(2)], sent=10, conversations=1)
    run.samples = [{"sent": s, "rss_kib": 100_000 + s, **gauges(ernie_prefix_cache_bytes=min(BOUND, BOUND * s / 4))}
                   for s in range(0, 11, 2)]  # full from the third sample on
    return dict(run=run, start=gauges(ernie_prefix_cache_hits=0, ernie_prefix_cache_queries=0,
                                      ernie_engine_prefill_tokens=0, ernie_engine_decode_tokens=0),
                end=gauges(), ref_end=gauges(), probe_before=32, probe_after=0, n=10, rss_margin=8 << 20,
                load_s=1.0, total_s=2.0)


def test_a_passing_soak_passes():
    rep = soak.report(**passing())
    assert soak.passed(rep), soak.table(rep)
    assert rep["dropped_prefill_tokens"] == 150 - 2 * (100 - 32)
    assert rep["dropped_decode_tokens"] == 40 - 2 * 15
    assert (rep["rss_warm_mib"], rep["rss_end_mib"]) == (round(100_004 / 1024, 1), round(100_010 / 1024, 1))


def _answer_differs(a):
    a["run"].records[1].reference = dataclasses.replace(a["run"].records[1].answer, text="another")


def _reference_failed(a):
    a["run"].records[1].reference = None
    a["run"].failures.append("reference, conversation 0 turn 0: HTTP 500")


def _over_the_bound(a):
    a["run"].samples[2]["ernie_prefix_cache_bytes"] = BOUND + 1


def _no_hits(a):
    a["end"]["ernie_prefix_cache_hits"] = 0


def _probe_still_cached(a):
    a["probe_after"] = 32


def _never_full(a):
    for s in a["run"].samples:
        s["ernie_prefix_cache_bytes"] = min(s["ernie_prefix_cache_bytes"], 0.8 * BOUND)


def _left_running(a):
    a["end"]["ernie_num_requests_running"] = 1


def _left_waiting_on_the_reference(a):
    a["ref_end"]["ernie_num_requests_waiting"] = 2


def _memory_grew(a):
    a["run"].samples[-1]["rss_kib"] += 9 * 1024


@pytest.mark.parametrize("fault, check", [
    (_answer_differs, "answers equal the reference's"), (_reference_failed, "answers equal the reference's"),
    (_over_the_bound, "pool bytes within the bound"), (_no_hits, "prefixes reused"),
    (_probe_still_cached, "blocks evicted"), (_never_full, "blocks evicted"),
    (_left_running, "nothing left in use"), (_left_waiting_on_the_reference, "nothing left in use"),
    (_memory_grew, "resident memory flat after warm-up")])
def test_each_check_fails_on_its_fault(fault, check):
    args = passing()
    fault(args)
    rep = soak.report(**args)
    assert [name for name, c in rep["checks"].items() if not c["ok"]] == [check]
    assert not soak.passed(rep)


def test_a_server_without_prefix_metrics_is_named():
    text = "\n".join(f"{k} 0.0" for k in soak.METRICS if k != "ernie_prefix_cache_bytes")
    with pytest.raises(RuntimeError) as e:
        soak.parse_metrics(text, "http://127.0.0.1:1")
    assert str(e.value) == ("http://127.0.0.1:1/metrics has no ernie_prefix_cache_bytes: the server does not report "
                            "prefix reuse")
    # a counter as prometheus_client exposes it: its sample is NAME_total, beside NAME_created
    counters = "\n".join(f"{k} 7.0" for k in soak.METRICS if k != "ernie_prefix_cache_hits")
    counters += "\nernie_prefix_cache_hits_total 5.0\nernie_prefix_cache_hits_created 1.7e9"
    assert soak.parse_metrics(counters)["ernie_prefix_cache_hits"] == 5.0


def test_a_conversation_resends_its_history_and_shares_the_heads():
    w = soak.Workload("m", lambda t: len(t.split()), 2048, soak.SMALL, seed=3)
    convs = [soak.Conversation(w, i) for i in range(12)]
    assert [c.head for c in convs] == [soak.Conversation(w, i).head for i in range(12)]  # the same texts each time
    assert len({c.head for c in convs}) < len(convs)  # shared system prompts and documents
    chat, text = convs[0], convs[1]
    assert (chat.kind, text.kind) == ("chat", "completion")
    first, second = text.ask(0, []), text.ask(1, [(text.turns[0][0], " an answer")])
    assert second.body["prompt"].startswith(first.body["prompt"] + " an answer\n\n")
    msgs = chat.ask(1, [(chat.turns[0][0], "an answer")]).body["messages"]
    assert msgs[:2] == chat.ask(0, []).body["messages"] and msgs[2] == {"role": "assistant", "content": "an answer"}


def test_the_pool_is_never_above_its_bound_while_storing():
    """What the soak caught (a peak of 6.12 MiB under a 6 MiB bound): a store added its blocks before evicting, so
    /metrics could read more than the bound. Blocks here are 512 bytes (one layer, one head of 2 float32 dims)."""
    import numpy as np

    from ernie_paddle.serving.prefix_cache import PrefixCache

    seen = []

    class Watched(PrefixCache):
        def _put(self, name, block):
            super()._put(name, block)
            seen.append(self.nbytes)

    def read(start, end):
        return [(np.zeros((1, end - start, 2), np.float32), np.ones((1, end - start, 2), np.float32))]

    pool = Watched(4 * 512)
    prompts = [np.random.default_rng(i).integers(3, 500, 100).tolist() for i in range(5)]  # 3 blocks each
    for ids in prompts:
        pool.store(ids, len(ids), read)
    assert max(seen) <= pool.max_bytes and pool.nbytes == 4 * 512
    assert pool.lookup(prompts[-1], 99)[0] == 96 and pool.lookup(prompts[0], 99)[0] == 0
    long = np.random.default_rng(9).integers(3, 500, 200).tolist()  # 6 blocks: the first 4 fit
    pool.store(long, len(long), read)
    assert max(seen) <= pool.max_bytes and pool.lookup(long, 199)[0] == 128

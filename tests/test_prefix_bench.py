"""tools/prefix_bench on the shipped model: a short conversation and a short document, its JSON's structure and
what prompt reuse must show in it (cached tokens with reuse from turn 2 on, none without, the same answers); the
timings are only printed, not bounded (a shared machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TURNS, DOC_TOKENS = 3, 300
SMALL = ["--preset", "shipped", "--turns", str(TURNS), "--turn-words", "30", "--max-tokens", "4", "--doc-tokens",
         str(DOC_TOKENS)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prefix-bench"))  # the shipped export, made once for the module's runs


def _run(work: str, out: str, *extra: str) -> tuple[dict, list[str]]:
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.prefix_bench", *SMALL, "--work", work, "--json",
                        out, *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(out)), r.stdout.splitlines()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _check_meta(meta: dict) -> None:
    from ernie_paddle import __version__
    from ernie_paddle.sysinfo import cpu_isa, cpu_model

    assert (meta["cpu"], meta["cpu_isa"], meta["ernie_paddle"], meta["preset"]) == (cpu_model(), cpu_isa(),
                                                                                     __version__, "shipped")
    assert (meta["turns"], meta["doc_tokens"], meta["max_tokens"]) == (TURNS, DOC_TOKENS, 4)


def test_ours_with_and_without_reuse(work, tmp_path):
    from ernie_paddle.cli.args import default_model_dir
    from ernie_paddle.serving.prefix_cache import BLOCK_TOKENS
    from ernie_paddle.text.tokenizer import ErnieTokenizer
    from ernie_paddle.tools.prefix_bench import next_prompt

    tok = ErnieTokenizer(default_model_dir())  # the shipped model's, the export's too
    data, out = _run(work, str(tmp_path / "p.json"), "--engines", "ours,ours-no-reuse")
    _check_meta(data["meta"])
    mt = data["multi_turn"]
    assert mt["report_turns"] == [1, 2, 3] and set(mt["engines"]) == {"ours", "ours-no-reuse"}
    reuse, plain = (mt["engines"][e]["turns"] for e in ("ours", "ours-no-reuse"))
    assert [r["turn"] for r in reuse] == [r["turn"] for r in plain] == [1, 2, 3]
    prompts = [reuse[0]["text"]]  # the conversation: then each prompt is the last one, its answer and a new text
    for last, a in zip(reuse, reuse[1:]):
        prompts.append(next_prompt(prompts[-1], last["answer"], a["text"]))
    for turn, (a, b) in enumerate(zip(reuse, plain), 1):
        assert a["text"] == b["text"] and a["prompt_tokens"] == b["prompt_tokens"]  # the replayed prompt
        assert a["answer"] == b["answer"] and a["answer"]  # greedy, exact with reuse
        assert b["cached_tokens"] == 0  # --prefix-cache-memory 0
        assert a["ttft_s"] > 0 and b["ttft_s"] > 0
        ids = tok.encode(prompts[turn - 1])
        assert a["prompt_tokens"] == len(ids)
        if turn == 1:
            assert a["cached_tokens"] == 0  # the warm-up shares no prefix with it
        else:  # whole blocks of what the last turn computed (its prompt, and its answer too), never the last token
            before = prompts[turn - 2]
            shared = _common_prefix(ids, tok.encode(before))
            floor = min(shared, len(ids) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
            assert a["cached_tokens"] % BLOCK_TOKENS == 0 and floor <= a["cached_tokens"] < len(ids), (turn, floor)
            assert a["cached_tokens"] > 0
    assert mt["answers_equal"] is True
    assert mt["last_over_first"]["ours"] == round(reuse[-1]["ttft_s"] / reuse[0]["ttft_s"], 2)
    assert mt["engines"]["ours"]["peak_rss_mib"] > 0
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out[2:2 + TURNS]}  # the printed table, from the JSON
    for a, b in zip(reuse, plain):
        assert rows[str(a["turn"])][1:5] == [str(a["prompt_tokens"]), str(a["cached_tokens"]), str(a["ttft_s"]),
                                             str(b["ttft_s"])]

    doc = data["document"]
    assert "llama" not in doc and doc["document_tokens"] == DOC_TOKENS
    runs = doc["ours"]
    assert (runs["save"]["prompt_tokens"], runs["save"]["cached_tokens"]) == (DOC_TOKENS, 0)
    assert (runs["cached"]["prompt_tokens"], runs["cached"]["cached_tokens"]) == (DOC_TOKENS + doc["question_tokens"],
                                                                                  DOC_TOKENS)
    assert (runs["alone"]["prompt_tokens"], runs["alone"]["cached_tokens"]) == (doc["question_tokens"], 0)
    assert runs["cached_over_alone"] == round(runs["cached"]["ttft_s"] / runs["alone"]["ttft_s"], 2)
    assert runs["state_file_mib"] > 0


def test_llama_cpp_side_by_side(work, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's server extra")
    data, _ = _run(work, str(tmp_path / "p.json"), "--engines", "ours,llama", "--report-turns", "1,3")
    mt = data["multi_turn"]
    assert mt["report_turns"] == [1, 3]
    llama = mt["engines"]["llama"]["turns"]
    assert [r["turn"] for r in llama] == [1, 2, 3]  # every turn runs: its slot carries the conversation
    assert llama[0]["cached_tokens"] == 0 and all(0 < r["cached_tokens"] < r["prompt_tokens"] for r in llama[1:])
    assert llama[0]["prompt_tokens"] == mt["engines"]["ours"]["turns"][0]["prompt_tokens"]  # one tokenizer
    ours = {r["turn"]: r for r in mt["engines"]["ours"]["turns"]}
    assert mt["ours_over_llama"] == {str(n): round(ours[n]["ttft_s"] / llama[n - 1]["ttft_s"], 2) for n in (1, 3)}
    runs = data["document"]["llama"]
    assert [runs[r]["cached_tokens"] for r in ("save", "cached", "alone")] == [0, DOC_TOKENS, 0]
    assert runs["state_file_mib"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--report-turns", "4,2"], "argument --report-turns: expected increasing turns up to --turns 8, got 4,2"),
    (["--turns", "3", "--report-turns", "1,4"],
     "argument --report-turns: expected increasing turns up to --turns 3, got 1,4"),
    (["--engines", "ours,vllm"], "argument --engines: unknown engine vllm; choose from ours, ours-no-reuse, llama"),
    (["--doc-tokens", "0"], "argument --doc-tokens: must be a positive integer, got 0"),
])
def test_arguments_are_refused_as_they_are_read(capsys, argv, message):
    from ernie_paddle.tools.prefix_bench import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"prefix_bench: error: {message}"

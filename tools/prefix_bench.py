"""Prompt reuse measured side by side on the same weights: a multi-turn conversation through `/v1/completions` and
questions about one document, for `ernie-onnx` (with prefix reuse and without it) and llama.cpp.

Multi-turn: a conversation of `--turns` turns, greedy, `--max-tokens` new tokens each; every turn adds about
`--turn-words` words of the shipped corpus to the previous prompt and the previous answer. Time to first token
(streamed: the first token event) per turn for `ernie-onnx serve` (default `--prefix-cache-memory`), the same with
`--prefix-cache-memory 0`, and llama.cpp's server (llama-cpp-python[server], which reuses the prefix its one slot
computed last), each server alone in its process. Document Q&A: `--doc-tokens` tokens of the corpus saved once
(`ernie-onnx generate --prompt-cache FILE`; llama.cpp: its state file), then the document and a question with that
file, and the question alone with no document; each run its own process, as a user runs them. A program, not a
test:

    python -m ernie_paddle.tools.prefix_bench --preset mid --work /tmp/prefix-mid --json prefix-mid.json --plot p.png
    python -m ernie_paddle.tools.prefix_bench --preset 21b-a3b --report-turns 1,4,8 --doc-tokens 4096
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

from ernie_paddle.atomic import atomic_path, write_json, write_png
from ernie_paddle.benchmarking.charts import subplots
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.benchmarking.servers import free_port, llama_cmd, ours_cmd, peak_rss_kib, start, stop
from ernie_paddle.benchmarking.setups import SETUPS, log, name_list, prepare, run_meta
from ernie_paddle.cli.args import non_negative_int, positive_int, positive_int_list
from ernie_paddle.interrupts import run_command
from ernie_paddle.sysinfo import peak_rss

ENGINES = ("ours", "ours-no-reuse", "llama")  # ernie-onnx with prefix reuse, without it, llama.cpp
PARTS = ("multi-turn", "document")
NO_REUSE = ["--prefix-cache-memory", "0"]
# at the full shape llama.cpp's server held the mapped GGUF (12 GB) beside its repacked Q4_0 copy (12 GB) and was
# killed for memory on this 24 GB machine; read into memory instead, it keeps the repacked copy only
LLAMA_NO_MMAP = {"21b-a3b": ["--use_mmap", "False"]}
QUESTION_WORDS = 24  # the document question's length
# llama-cpp-python's log line (verbose, its server's default) when a prompt starts with what its slot holds
LLAMA_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens")


# ---- the text ---------------------------------------------------------------------------------------------------
def corpus_pieces(n: int, words: int, seed: int) -> list[str]:
    """`n` consecutive pieces of `words` words of the held-out corpus, from a place the seed picks: what each turn
    of one conversation adds."""
    from ernie_paddle.corpus import held_out_text

    all_words = held_out_text().split(" ")
    if n * words >= len(all_words):
        raise ValueError(f"{n} pieces of {words} words need more than the corpus's {len(all_words)} words")
    s = random.Random(seed).randrange(0, len(all_words) - n * words)
    return [" ".join(all_words[s + i * words:s + (i + 1) * words]) for i in range(n)]


def next_prompt(prompt: str | None, answer: str | None, text: str) -> str:
    """A conversation's next prompt: the last prompt, its answer and the new text (the first turn: the text)."""
    return text if prompt is None else f"{prompt}{answer}\n\n{text}"


def document_ids(folder: str, doc_tokens: int, seed: int) -> tuple[list[int], list[int]]:
    """A document of exactly `doc_tokens` corpus tokens (the tokenizer of `folder`) and a question of about
    QUESTION_WORDS words from elsewhere in the corpus, as token ids (one token sequence for every engine)."""
    from ernie_paddle.corpus import held_out_text, read_corpus
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer(folder)
    text = read_corpus()
    start = random.Random(seed).randrange(0, len(text) // 2)
    doc = tok.encode(text[start:start + doc_tokens * 12])[:doc_tokens]  # 12 characters a token is ample
    if len(doc) < doc_tokens:
        raise ValueError(f"--doc-tokens {doc_tokens}: the corpus gives {len(doc)} tokens from offset {start}")
    question = tok.encode("\n\nQuestion: " + " ".join(held_out_text().split(" ")[:QUESTION_WORDS]))
    return doc, question


# ---- multi-turn through a server --------------------------------------------------------------------------------
def complete(url: str, model: str, prompt: str, max_tokens: int, usage: bool) -> dict:
    """One streamed greedy completion: time to the first token event (its first text, or its end if the first token
    ends it), the answer, and (with `usage`) the final chunk's prompt_tokens and prompt_tokens_details.cached_tokens."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, parts, counts = None, [], {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=None) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or choice.get("finish_reason"):  # a first token that ends the answer has no text
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(choice.get("text") or "")
            if chunk.get("usage"):
                counts = chunk["usage"]
    if ttft is None:
        raise RuntimeError("the stream had no token")
    details = counts.get("prompt_tokens_details") or {}
    return {"ttft_s": round(ttft, 4), "answer": "".join(parts), "prompt_tokens": counts.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


def _served_name(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _llama_prompt_tokens(url: str, prompt: str) -> int | None:
    import httpx

    r = httpx.post(f"{url}/extras/tokenize", json={"input": prompt}, timeout=60)
    return len(r.json()["tokens"]) if r.status_code == 200 else None


class _LogTail:
    """What a server wrote to its log file since the last read."""

    def __init__(self, path: str):
        self.path, self.at = path, 0

    def read(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.at)
            text = f.read()
        self.at += len(text.encode("utf-8", errors="replace"))
        return text


def conversation(engine: str, cmd: list[str], log_file: str, texts: list[str], warmup: str, max_tokens: int,
                 turns: list[int], prompts: dict[int, str] | None = None) -> dict:
    """Run the conversation's `turns` (1-based) on a fresh server: each prompt is `prompts[turn]` when given (a
    replay), else built from the previous turn's prompt and this server's answer. Per turn: prompt tokens, cached
    tokens (ours: from the usage; llama.cpp: from its prefix-match log line), TTFT, the answer."""
    port = int(cmd[cmd.index("--port") + 1])
    proc = start(cmd, port, stderr_file=log_file)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        model = _served_name(url)
        ours = engine != "llama"
        tail = _LogTail(log_file)
        complete(url, model, warmup, max_tokens, ours)  # first-call costs, and a slot holding another prompt
        tail.read()
        prompt = answer = None
        for turn in range(1, max(turns) + 1):
            prompt = prompts[turn] if prompts else next_prompt(prompt, answer, texts[turn - 1])
            if turn not in turns:
                continue
            row = {"turn": turn, "text": texts[turn - 1], **complete(url, model, prompt, max_tokens, ours),
                   "prompt": prompt}  # the prompt is not written out: the texts and answers rebuild it
            answer = row["answer"]
            if not ours:
                hit = LLAMA_PREFIX_HIT.findall(tail.read())
                row["cached_tokens"] = int(hit[-1][0]) if hit else 0
                row["prompt_tokens"] = _llama_prompt_tokens(url, prompt)
            rows.append(row)
            log(f"prefix_bench: {engine} turn {turn}: {row['prompt_tokens']} prompt tokens, "
                f"{row['cached_tokens']} cached, TTFT {row['ttft_s']} s")
        peak = round(peak_rss_kib(proc.pid) / 1024, 1)
    finally:
        stop(proc)
    return {"turns": rows, "peak_rss_mib": peak}


def multi_turn(args: argparse.Namespace, paths: dict, engines: list[str], max_len: int) -> dict:
    """The conversation on each engine, one server at a time. `ours-no-reuse` replays the prompts `ours` built
    (greedy answers are the same with and without reuse: checked), on the reported turns only."""
    import httpx

    texts = corpus_pieces(args.turns + 1, args.turn_words, args.seed)
    warmup, texts = texts[0], texts[1:]
    report = args.report_turns or list(range(1, args.turns + 1))
    out: dict = {"report_turns": report, "engines": {}}
    for engine in engines:
        port = free_port()
        if engine == "llama":
            cmd = llama_cmd(paths["llama-q4_0"], port, args.threads, max_len) + LLAMA_NO_MMAP.get(args.preset, [])
        else:
            cmd = ours_cmd(paths["ort-int4"], port, args.threads, 1, max_len) + (NO_REUSE if engine != "ours" else [])
        replay, turns = None, list(range(1, args.turns + 1))
        if engine == "ours-no-reuse" and "turns" in out["engines"].get("ours", {}):
            replay = {r["turn"]: r["prompt"] for r in out["engines"]["ours"]["turns"]}
            turns = report  # no state carries from one request to the next: the other turns need not run
        log(f"prefix_bench: {engine}, turns {turns[0]}..{turns[-1]}")
        try:
            out["engines"][engine] = conversation(engine, cmd, os.path.join(args.work, f"{engine}-server.log"),
                                                  texts, warmup, args.max_tokens, turns, replay)
        except (RuntimeError, OSError, httpx.HTTPError) as e:  # a server that failed or was killed (out of memory)
            out["engines"][engine] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"prefix_bench: {engine} failed: {e}")
    return _multi_turn_ratios(out)


def _multi_turn_ratios(out: dict) -> dict:
    """Turn N / turn 1 of each engine, ours / llama.cpp per reported turn, and whether reuse changed an answer."""
    by = {e: {r["turn"]: r for r in d["turns"]} for e, d in out["engines"].items() if "turns" in d}
    report = out["report_turns"]
    out["last_over_first"] = {e: round(t[report[-1]]["ttft_s"] / t[report[0]]["ttft_s"], 2)
                              for e, t in by.items() if report[0] in t and report[-1] in t}
    for name, engine in (("ours_over_llama", "ours"), ("no_reuse_over_llama", "ours-no-reuse")):
        if engine in by and "llama" in by:
            out[name] = {str(n): round(by[engine][n]["ttft_s"] / by["llama"][n]["ttft_s"], 2)
                         for n in report if n in by[engine] and n in by["llama"]}
    if "ours" in by and "ours-no-reuse" in by:
        shared = [n for n in by["ours-no-reuse"] if n in by["ours"]]
        out["answers_equal"] = all(by["ours"][n]["answer"] == by["ours-no-reuse"][n]["answer"] for n in shared)
    return out


# ---- document Q&A -----------------------------------------------------------------------------------------------
def _ours_generate(folder: str, ids_file: str, max_tokens: int, threads: int, cache: str | None) -> dict:
    """`ernie-onnx generate --json` on the ids in `ids_file` (with `--prompt-cache cache`), in its own process."""
    cmd = [sys.executable, "-m", "ernie_paddle.cli.onnx_cli", "generate", "--model", folder, "--input-ids",
           f"@{ids_file}", "--max-new-tokens", str(max_tokens), "--threads", str(threads), "--json"]
    r = subprocess.run(cmd + (["--prompt-cache", cache] if cache else []), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1][:300])
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return {"prompt_tokens": got["prompt_tokens"], "cached_tokens": got.get("cached_tokens"),
            "ttft_s": got["first_token_seconds"], "peak_rss_gib": got["peak_rss_gib"],
            "first_token": (got["token_ids"] or [None])[0]}


def _llama_child(mode: str, gguf: str, ids_file: str, state: str, threads: int, n_ctx: int) -> dict:
    """llama.cpp, in a child process: `save` prefills the ids and writes its state file; `cached` loads the state
    file, checks that its tokens begin the ids and prefills the rest; `alone` prefills the ids. The time to the
    first token counts from before the state is loaded."""
    return json_from_child("ernie_paddle.tools.prefix_bench", [
        "--llama-doc", mode, "--gguf", gguf, "--ids", ids_file, "--state", state, "--threads", str(threads),
        "--n-ctx", str(n_ctx)], dict(os.environ, OMP_NUM_THREADS=str(threads)))


def llama_doc(mode: str, gguf: str, ids_file: str, state: str, threads: int, n_ctx: int) -> dict:
    """`_llama_child`'s work, in this process."""
    import llama_cpp
    import numpy as np

    from ernie_paddle.cli.args import token_ids

    ids = token_ids("@" + ids_file)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = 0
    if mode == "cached":
        tokens, n = (llama_cpp.llama_token * n_ctx)(), ctypes.c_size_t(0)
        if not llama_cpp.llama_state_load_file(llm.ctx, state.encode(), tokens, n_ctx, ctypes.byref(n)):
            raise RuntimeError(f"{state}: llama.cpp could not load the state file")
        cached = n.value
        if list(tokens[:cached]) != ids[:cached] or cached >= len(ids):
            raise RuntimeError(f"{state}: its {cached} tokens do not begin the prompt of {len(ids)}")
        llm.n_tokens = cached
        llm.input_ids[:cached] = ids[:cached]
    llm.eval(ids[cached:])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    first = int(logits.argmax())
    ttft = time.perf_counter() - t0
    if mode == "save":
        saved = (llama_cpp.llama_token * len(ids))(*ids)
        if not llama_cpp.llama_state_save_file(llm.ctx, state.encode(), saved, len(ids)):
            raise RuntimeError(f"{state}: llama.cpp could not write the state file")
    return {"prompt_tokens": len(ids), "cached_tokens": cached, "ttft_s": round(ttft, 4), "load_s": round(load_s, 2),
            "peak_rss_gib": round(peak_rss() / 2**30, 3), "first_token": first}


def document(args: argparse.Namespace, paths: dict, engines: list[str]) -> dict:
    """The document saved once, then the document and the question against the saved file, then the question
    alone; for ours (`generate --prompt-cache`) and llama.cpp (its state file), each run a fresh process."""
    doc, question = document_ids(paths["ort-int4"], args.doc_tokens, args.seed)
    folder = os.path.join(args.work, "document")
    os.makedirs(folder, exist_ok=True)
    files = {}
    for name, ids in (("document", doc), ("document+question", doc + question), ("question", question)):
        files[name] = os.path.join(folder, f"{name}.ids")
        with atomic_path(files[name]) as tmp, open(tmp, "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
    out: dict = {"document_tokens": len(doc), "question_tokens": len(question)}
    n_ctx = len(doc) + len(question) + args.max_tokens + 8
    for engine in [e for e in engines if e in ("ours", "llama")]:
        state = os.path.join(folder, f"{engine}-document.cache")
        asked = state + ".question"  # the question runs on a copy: the document's file stays as saved
        for f in (state, asked):
            if os.path.exists(f):
                os.unlink(f)
        runs = {}
        try:
            for run, ids_file, cache in (("save", files["document"], state),
                                         ("cached", files["document+question"], asked),
                                         ("alone", files["question"], None)):
                if run == "cached":
                    shutil.copyfile(state, asked)
                log(f"prefix_bench: {engine} document, {run}")
                if engine == "ours":
                    runs[run] = _ours_generate(paths["ort-int4"], ids_file, args.max_tokens, args.threads, cache)
                else:
                    runs[run] = _llama_child(run, paths["llama-q4_0"], ids_file, state, args.threads, n_ctx)
                log(f"prefix_bench: {engine} {run}: TTFT {runs[run]['ttft_s']} s, "
                    f"{runs[run]['cached_tokens']} cached")
        except (RuntimeError, ChildFailed, OSError) as e:
            why = e.stderr.strip().splitlines()[-1] if isinstance(e, ChildFailed) and e.stderr.strip() else str(e)
            runs["error"] = why[:300]
            log(f"prefix_bench: {engine} document failed: {why[:300]}")
        if "cached" in runs and "alone" in runs:
            runs["cached_over_alone"] = round(runs["cached"]["ttft_s"] / runs["alone"]["ttft_s"], 2)
            runs["saved_over_cached"] = round(runs["save"]["ttft_s"] / runs["cached"]["ttft_s"], 1)
        runs["state_file_mib"] = round(os.path.getsize(state) / 2**20, 1) if os.path.exists(state) else None
        out[engine] = runs
    return out


# ---- the report ------------------------------------------------------------------------------------------------
def _cell(row: dict | None, key: str):
    return "-" if row is None or row.get(key) is None else row[key]


def tables(result: dict) -> str:
    """The multi-turn table (one row per reported turn) and the document table, as printed."""
    lines = []
    mt = result.get("multi_turn")
    if mt:
        by = {e: {r["turn"]: r for r in d.get("turns", [])} for e, d in mt["engines"].items()}
        head = ["turn", "prompt tokens", "cached tokens (ours)", "ours TTFT s", "ours, no reuse TTFT s",
                "llama.cpp prompt tokens", "llama.cpp cached tokens", "llama.cpp TTFT s", "ours / llama.cpp"]
        lines += [" | ".join(head), " | ".join("---" for _ in head)]
        for n in mt["report_turns"]:
            ours, plain, llama = (by.get(e, {}).get(n) for e in ENGINES)
            ratio = mt.get("ours_over_llama", {}).get(str(n))
            lines.append(" | ".join(str(x) for x in (
                n, _cell(ours or plain, "prompt_tokens"), _cell(ours, "cached_tokens"), _cell(ours, "ttft_s"),
                _cell(plain, "ttft_s"), _cell(llama, "prompt_tokens"), _cell(llama, "cached_tokens"),
                _cell(llama, "ttft_s"), f"{ratio:.2f}x" if ratio else "-")))
        last = ", ".join(f"{e} {r}x" for e, r in mt.get("last_over_first", {}).items())
        lines.append(f"turn {mt['report_turns'][-1]} / turn {mt['report_turns'][0]}: {last or '-'}; "
                     f"answers with reuse equal answers without: {mt.get('answers_equal', '-')}")
        for e, d in mt["engines"].items():
            if "error" in d:
                lines.append(f"{e}: {d['error']}")
    doc = result.get("document")
    if doc:
        lines.append("")
        head = ["engine", f"document ({doc['document_tokens']} tokens) saved: TTFT s", "question + cached document: "
                "TTFT s", "cached tokens", "question alone: TTFT s", "cached / alone", "cache file MiB"]
        lines += [" | ".join(head), " | ".join("---" for _ in head)]
        for engine in ("ours", "llama"):
            runs = doc.get(engine)
            if runs is None:
                continue
            if "error" in runs:
                lines.append(f"{engine} | {runs['error']}")
                continue
            ratio = runs.get("cached_over_alone")
            lines.append(" | ".join(str(x) for x in (
                engine, runs["save"]["ttft_s"], runs["cached"]["ttft_s"], runs["cached"]["cached_tokens"],
                runs["alone"]["ttft_s"], f"{ratio:.2f}x" if ratio else "-", runs["state_file_mib"])))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """TTFT per turn of each engine, and the document runs' TTFT side by side."""
    made = subplots("prefix_bench", 1, 2, figsize=(11, 4))
    if made is None:
        return
    fig, (a, b) = made
    names = {"ours": "ernie-onnx, prefix reuse", "ours-no-reuse": "ernie-onnx, no reuse", "llama": "llama.cpp server"}
    for e, d in (result.get("multi_turn") or {}).get("engines", {}).items():
        if d.get("turns"):
            a.plot([r["turn"] for r in d["turns"]], [r["ttft_s"] for r in d["turns"]], marker="o", label=names[e])
    a.set(xlabel="turn", ylabel="time to first token (s)", title="multi-turn conversation")
    a.xaxis.get_major_locator().set_params(integer=True)
    a.set_ylim(bottom=0)
    a.legend()
    doc = result.get("document") or {}
    runs = [("save", "document"), ("cached", "question +\ncached document"), ("alone", "question alone")]
    engines = [e for e in ("ours", "llama") if "alone" in doc.get(e, {})]
    for i, e in enumerate(engines):
        b.bar([x + 0.4 * i for x in range(len(runs))], [doc[e][r]["ttft_s"] for r, _ in runs], 0.4,
              label="ernie-onnx" if e == "ours" else "llama.cpp")
    b.set_xticks([x + 0.2 * (len(engines) - 1) for x in range(len(runs))], [label for _, label in runs])
    b.set(ylabel="time to first token (s)", yscale="log",
          title=f"document of {doc.get('document_tokens', '?')} tokens")
    if engines:
        b.legend()
    fig.tight_layout()
    write_png(fig, path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prefix_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mid", choices=list(SETUPS),
                   help="mid: the 21B-A3B widths with 3 layers; 21b-a3b: the full shape; shipped, tiny: smoke tests")
    p.add_argument("--num-layers", type=positive_int, default=None, help="override the preset's layer count")
    p.add_argument("--work", default=None, help="folder for the exports, GGUF, logs and cache files (reused)")
    p.add_argument("--engines", default=list(ENGINES), type=name_list(ENGINES, "engine"),
                   help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--parts", default=list(PARTS), type=name_list(PARTS, "part"),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--turns", type=positive_int, default=8)
    p.add_argument("--report-turns", type=positive_int_list, default=None,
                   help="turns timed without reuse and shown in the table, e.g. 1,4,8 (default: every turn)")
    p.add_argument("--turn-words", type=positive_int, default=80, help="words of text each turn adds")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="new tokens per answer")
    p.add_argument("--doc-tokens", type=positive_int, default=4096)
    p.add_argument("--max-model-len", type=positive_int, default=4096, help="the servers' context")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--llama-doc", choices=["save", "cached", "alone"], help=argparse.SUPPRESS)  # internal: a child
    for hidden in ("--gguf", "--ids", "--state"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-ctx", type=positive_int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_turns and (sorted(set(args.report_turns)) != args.report_turns or args.report_turns[-1] >
                              args.turns):
        p.error(f"argument --report-turns: expected increasing turns up to --turns {args.turns}, got "
                f"{','.join(map(str, args.report_turns))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.llama_doc:
        print(json.dumps(llama_doc(args.llama_doc, args.gguf, args.ids, args.state, args.threads, args.n_ctx)))
        return 0
    args.work = os.path.abspath(args.work or os.path.join(os.getcwd(), f"prefix-bench-{args.preset}"))
    artifacts = ["ort-int4"] + (["llama-q4_0"] if "llama" in args.engines else [])
    paths, refused, cfg = prepare(args.preset, args.work, artifacts, args.seed, args.num_layers,
                                  tokenizer_from_shipped=True)
    if refused:
        raise RuntimeError(f"cannot prepare: {refused}")
    max_len = min(args.max_model_len, cfg.max_position_embeddings)
    result: dict = {"meta": run_meta(
        args.preset, cfg, args.threads, max_tokens=args.max_tokens, turns=args.turns, turn_words=args.turn_words,
        doc_tokens=args.doc_tokens, weights="the ort-int4 export (int8 KV cache) and GGUF Q4_0, from the same tensors")}
    if "multi-turn" in args.parts:
        result["multi_turn"] = multi_turn(args, paths, args.engines, max_len)
    if "document" in args.parts:
        result["document"] = document(args, paths, args.engines)
    print(tables(result))
    for d in result.get("multi_turn", {}).get("engines", {}).values():
        for row in d.get("turns", []):
            del row["prompt"]
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "prefix_bench"))

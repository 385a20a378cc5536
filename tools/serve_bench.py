"""Load-test OpenAI-compatible servers on the same weights: `ernie-onnx serve` (continuous batching) and
llama.cpp's server (llama-cpp-python[server]) on the GGUF of the same checkpoint.

For each concurrency level, that many clients each stream requests one after another (prompts of realistic
lengths cut from the shipped corpus, a fixed answer length). Reported per server and level: aggregate generated
tokens/s, time to first token p50/p95 and inter-token latency p50/p95. The ONNX Runtime runtime's static batch
decode on the same folder is measured first, alone, as the reference continuous batching should match. `--soak N`
instead sends N requests with client disconnects and bad requests mixed in, and checks that every slot is free,
every good request succeeded and memory stayed flat. A program, not a test:

    python -m ernie_paddle.tools.serve_bench --preset shipped --json serve.json --plot serve.png
    python -m ernie_paddle.tools.serve_bench --preset mid --concurrency 1,2,4,8
    python -m ernie_paddle.tools.serve_bench --preset shipped --soak 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

from ernie_paddle.atomic import write_json, write_png
from ernie_paddle.benchmarking.charts import subplots
from ernie_paddle.benchmarking.servers import free_port, llama_cmd, ours_cmd, rss_kib, start, stop
from ernie_paddle.benchmarking.setups import SETUPS, log, measure_in_child, prepare
from ernie_paddle.cli.args import non_negative_int, positive_int, positive_int_list
from ernie_paddle.interrupts import run_command


# ---- the load ---------------------------------------------------------------------------------------------
def prompts(n: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """`n` prompts of about lengths[0]..lengths[1] words, cut from the held-out corpus at random places."""
    from ernie_paddle.corpus import held_out_text

    words = held_out_text().split(" ")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*lengths)
        s = rng.randrange(0, len(words) - k)
        out.append(" ".join(words[s:s + k]))
    return out


async def stream_one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: arrival times of its chunks and how many tokens it generated."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, finish = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text"):
                stamps.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
    if not stamps:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0, "gaps": gaps, "tokens": len(stamps), "finish": finish,
            "decoding": (stamps[0], stamps[-1])}


async def load(url: str, model: str, texts: list[str], concurrency: int, per_client: int,
               max_tokens: int) -> dict:
    """`concurrency` clients, each streaming `per_client` requests back to back; aggregate figures."""
    import httpx

    async with httpx.AsyncClient(timeout=None) as client:
        queue = list(texts[:concurrency * per_client])
        results: list[dict] = []

        async def client_loop(i: int) -> None:
            for j in range(per_client):
                results.append(await stream_one(client, url, model, queue[i * per_client + j], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    # decode throughput: tokens after each request's first, over the time some request was decoding (the union of
    # their first-to-last-token intervals), so a server that runs requests one at a time is not credited for them
    busy = _union([r["decoding"] for r in ok])
    decode = round(sum(r["tokens"] - 1 for r in ok) / busy, 2) if busy else None
    return {"concurrency": concurrency, "requests": len(results), "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 2), "decode_tok_s": decode,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
            "itl_p50_ms": _pct(gaps, 50, 1000), "itl_p95_ms": _pct(gaps, 95, 1000)}


def _served_name(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _engine_totals(url: str) -> dict | None:
    """Our server's engine counters from /metrics (None for servers without them)."""
    import httpx

    names = {f"ernie_engine_{k}_total": k for k in ("decode_seconds", "decode_tokens", "prefill_seconds",
                                                      "prefill_tokens")}
    text = httpx.get(f"{url}/metrics").text
    found = {names[p[0]]: float(p[1]) for p in (line.split() for line in text.splitlines())
             if len(p) == 2 and p[0] in names}
    return found if len(found) == len(names) else None


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(values, q)) * scale, 4)


# ---- the soak ----------------------------------------------------------------------------------------------
async def soak(url: str, model: str, pid: int, texts: list[str], n: int, concurrency: int, max_tokens: int,
               seed: int) -> dict:
    """`n` requests from `concurrency` clients: about 10% disconnect mid-stream, 10% are bad requests; RSS is
    sampled after each tenth of the run. Returns counts, the RSS samples and the server's final gauges."""
    import httpx

    rng = random.Random(seed)
    kinds = [rng.choices(["good", "disconnect", "bad"], [0.8, 0.1, 0.1])[0] for _ in range(n)]
    counts = {"good_ok": 0, "good_failed": 0, "disconnects": 0, "bad_4xx": 0, "bad_other": 0}
    failures: list[str] = []
    rss = [rss_kib(pid)]
    bad_bodies = [{"model": model, "prompt": "x", "max_tokens": -1}, {"model": "nope", "prompt": "x"},
                  {"model": model, "prompt": "x", "temperature": 9}, {"model": model}]
    next_i = 0

    async with httpx.AsyncClient(timeout=None) as client:
        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i, next_i = next_i, next_i + 1
                kind, text = kinds[i], texts[i % len(texts)]
                if kind == "bad":
                    r = await client.post(f"{url}/v1/completions", json=bad_bodies[i % len(bad_bodies)])
                    counts["bad_4xx" if 400 <= r.status_code < 500 else "bad_other"] += 1
                elif kind == "disconnect":
                    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": True}
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        seen = 0
                        async for line in r.aiter_lines():
                            seen += line.startswith("data: ")
                            if seen >= rng.randint(1, 5):
                                break  # leaving the block closes the connection mid-stream
                    counts["disconnects"] += 1
                else:
                    res = await stream_one(client, url, model, text, max_tokens)
                    if "error" in res:
                        counts["good_failed"] += 1
                        failures.append(res["error"])
                    else:
                        counts["good_ok"] += 1
                if i % max(1, n // 10) == 0:
                    rss.append(rss_kib(pid))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(0.5)
        rss.append(rss_kib(pid))
        metrics = (await client.get(f"{url}/metrics")).text
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#") and ("waiting" in line or "running" in line)}
    return {"requests": n, **counts, "failures": failures[:5], "rss_mib": [round(k / 1024, 1) for k in rss],
            "final_gauges": gauges}


# ---- the program ------------------------------------------------------------------------------------------
def _static_decode(folder: str, threads: int, batches: list[int], vocab: int) -> dict:
    """The runtime's own decode tokens/s at each batch size on the folder (bench's measurement, in a child)."""
    row = measure_in_child("ort-int4", folder, prompt_lengths=[16], batches=batches, decode_tokens=64,
                           threads=threads, seed=0, vocab=vocab)
    return {"error": row["error"]} if "error" in row else row["decode_tok_s"]


def _table(rows: list[dict], static: dict) -> str:
    """One row per server and concurrency. Decode throughput as clients see it (tokens after each first one over the
    time some request was decoding: interleaved prefills included) and as our engine counts it (tokens of its
    decode steps over their seconds), the latter as a ratio to the runtime's static batch decode."""
    head = ["server", "streams", "tok/s (all)", "decode tok/s (client)", "decode tok/s (engine)",
            "engine vs static batch", "TTFT p50 s", "TTFT p95 s", "ITL p50 ms", "ITL p95 ms", "errors"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        base = static.get(str(r["concurrency"])) if isinstance(static, dict) else None
        engine = r.get("engine_decode_tok_s")
        ratio = f"{engine / base:.2f}x" if base and engine else "-"
        lines.append(" | ".join(str(x) for x in (r["server"], r["concurrency"], r["tok_s"], r["decode_tok_s"],
                                                   engine or "-", ratio,
                                                   r["ttft_p50_s"], r["ttft_p95_s"], r["itl_p50_ms"],
                                                   r["itl_p95_ms"], len(r["errors"]))))
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    made = subplots("serve_bench", 1, 2, figsize=(10, 4))
    if made is None:
        return
    fig, (a, b) = made
    for server in sorted({r["server"] for r in rows}):
        mine = [r for r in rows if r["server"] == server]
        a.plot([r["concurrency"] for r in mine], [r["tok_s"] for r in mine], marker="o", label=server)
        b.plot([r["concurrency"] for r in mine], [r["itl_p95_ms"] for r in mine], marker="o", label=server)
    a.set(xlabel="concurrent streams", ylabel="aggregate tokens / s")
    b.set(xlabel="concurrent streams", ylabel="inter-token latency p95 (ms)")
    a.legend()
    write_png(fig, path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shipped", choices=[k for k in SETUPS if k != "21b-a3b"])
    p.add_argument("--num-layers", type=positive_int, default=None, help="override the preset's layer count")
    p.add_argument("--work", default=None, help="folder for the exports and GGUF files (reused)")
    p.add_argument("--servers", default="ours,llama", help="comma-separated: ours, llama")
    p.add_argument("--concurrency", default=[1, 2, 4, 8], type=positive_int_list)
    p.add_argument("--requests-per-stream", type=positive_int, default=3)
    p.add_argument("--prompt-words", default=[48, 320], type=positive_int_list,
                   help="prompt lengths in words, min,max (about 1.3 tokens a word)")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="answer length")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--soak", type=non_negative_int, default=0, help="run N soak requests instead of the load")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    servers = [s for s in args.servers.split(",") if s]
    work = args.work or os.path.join(os.getcwd(), f"serve-bench-{args.preset}")
    engines = ["ort-int4"] + (["llama-q4_0"] if "llama" in servers else [])
    paths, refused, cfg = prepare(args.preset, work, engines, args.seed, args.num_layers,
                                  tokenizer_from_shipped=True)
    if refused:
        raise RuntimeError(f"cannot prepare: {refused}")
    max_len = 2048
    texts = prompts(max(args.soak, max(args.concurrency) * args.requests_per_stream), tuple(args.prompt_words),
                    args.seed)
    if args.soak:
        port = free_port()
        proc = start(ours_cmd(paths["ort-int4"], port, args.threads, 8, max_len), port)
        try:
            url = f"http://127.0.0.1:{port}"
            report = asyncio.run(soak(url, _served_name(url), proc.pid, texts, args.soak, 8, args.max_tokens,
                                      args.seed))
        finally:
            stop(proc)
        print(json.dumps(report, indent=1))
        if args.json:
            write_json(args.json, {"soak": report})
        return 0
    static = _static_decode(paths["ort-int4"], args.threads, [1, 2, 4, 8], cfg.vocab_size)
    log(f"serve_bench: static decode tok/s {static}")
    rows = []
    for server in servers:
        port = free_port()
        cmd = ours_cmd(paths["ort-int4"], port, args.threads, max(args.concurrency), max_len) if server == "ours" \
            else llama_cmd(paths["llama-q4_0"], port, args.threads, max_len)
        log(f"serve_bench: starting {server}")
        proc = start(cmd, port)
        try:
            url = f"http://127.0.0.1:{port}"
            model = _served_name(url)
            asyncio.run(load(url, model, texts, 1, 1, 8))  # warm-up
            for c in args.concurrency:
                before = _engine_totals(url)
                row = asyncio.run(load(url, model, texts, c, args.requests_per_stream, args.max_tokens))
                after = _engine_totals(url)
                if before and after and after["decode_seconds"] > before["decode_seconds"]:
                    # the server's own figure: tokens of its decode steps over their seconds, prefill excluded
                    row["engine_decode_tok_s"] = round((after["decode_tokens"] - before["decode_tokens"]) /
                                                       (after["decode_seconds"] - before["decode_seconds"]), 2)
                rows.append({"server": server, **row})
                log(f"serve_bench: {server} x{c}: {row['tok_s']} tok/s, ITL p95 {row['itl_p95_ms']} ms")
        finally:
            stop(proc)
    print(_table(rows, static))
    if args.json:
        write_json(args.json, {"preset": args.preset, "threads": args.threads, "max_tokens": args.max_tokens,
                               "static_decode_tok_s": static, "results": rows})
    if args.plot:
        _plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "serve_bench"))

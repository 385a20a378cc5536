"""The grammar engines side by side: llguidance (what the server uses) against xgrammar, on the same token
vocabulary, for JSON schemas: the time to compile a schema, and the time of one token's mask while a valid answer
is walked token by token (mask, then consume the token); for llguidance also the mask unpacked and applied to the
logits, as `generation.Decoding` does it.

Two vocabularies, both 103,424 ids wide (ERNIE-4.5's): `shipped`, the shipped model's 2048 tokens (the rest of the
ids never allowed), and `full`, those tokens plus pieces of the corpus's words up to 103,424 real tokens, so that
the engines walk a trie of the real size. xgrammar needs torch at run time and is imported only here:

    PYTHONPATH=/path/to/xgrammar python -m ernie_paddle.tools.grammar_bench --json grammar.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import numpy as np

from ernie_paddle import grammar
from ernie_paddle.cli.args import default_model_dir, positive_int

VOCAB = 103424  # ERNIE-4.5's vocabulary
EOS = 2
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                             "gift": {"type": "boolean"}},
            "required": ["sku", "qty", "gift"], "additionalProperties": False}},
        "status": {"enum": ["new", "paid", "shipped"]}}, "required": ["id", "items", "status"],
        "additionalProperties": False},
    "wide-40": {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 6}
                                                 for i in range(40)},
                "required": [f"field_{i}" for i in range(40)], "additionalProperties": False},
}


def shipped_pieces() -> list[bytes]:
    """The shipped tokenizer's tokens as the bytes each one decodes to."""
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer(default_model_dir())
    lt = grammar.grammar_tokenizer(default_model_dir(), tok.vocab_size, tok.stop_ids())
    return [lt.decode_bytes([i]) for i in range(tok.vocab_size)]


def full_pieces(base: list[bytes], size: int) -> list[bytes]:
    """`base` then distinct pieces of the corpus's words (whole words, with and without a leading space, then
    their substrings, longest first) until there are `size` tokens."""
    from ernie_paddle.corpus import read_corpus

    seen, out = set(base), list(base)
    words = sorted(set(re.findall(r"[A-Za-z']+|[0-9]+|[^\sA-Za-z0-9']", read_corpus())))
    candidates = [w.encode() for w in words] + [b" " + w.encode() for w in words]
    candidates += [w[i:i + n].encode() for n in range(8, 1, -1) for w in words for i in range(len(w) - n + 1)]
    candidates += [b" " + w[:n].encode() for n in range(7, 0, -1) for w in words]
    for c in candidates:
        if c not in seen:
            seen.add(c)
            out.append(c)
            if len(out) == size:
                return out
    n = 0
    while len(out) < size:  # (not reached on the shipped corpus) numbered filler
        c = f"<fill{n}>".encode()
        n += 1
        if c not in seen:
            out.append(c)
    return out


class _Greedy:
    """The string tokenizer llguidance's wrapper asks for: greedy longest match over the pieces."""

    def __init__(self, pieces: list[bytes]):
        self.tokens, self.eos_token_id, self.bos_token_id, self.special_token_ids = pieces, EOS, 1, [0, 1, 2]
        self._ids = {p: i for i, p in enumerate(pieces) if p}
        self._longest = max(map(len, self._ids))

    def __call__(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                t = self._ids.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                raise ValueError(f"byte {data[i]} has no token")
        return out


def llg_tokenizer(pieces: list[bytes]):
    """llguidance's tokenizer of a vocabulary given as its tokens' bytes."""
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Greedy(pieces)), n_vocab=VOCAB, eos_token=EOS)


def answer_tokens(constraint: grammar.Constraint, seed: int, limit: int = 2000) -> list[int]:
    """A valid answer's tokens: random logits under the grammar's masks, until it is complete."""
    m, rng, out = constraint.matcher(), np.random.default_rng(seed), []
    for _ in range(limit):
        t = int(m.mask(rng.standard_normal(VOCAB).astype(np.float32)).argmax())
        m.consume(t)
        out.append(t)
        if m.done:
            return out
    raise RuntimeError(f"no complete answer in {limit} tokens")


def bench_llguidance(lt, schema: dict, tokens: list[int], repeats: int) -> dict:
    compile_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = grammar.json_schema(lt, schema, VOCAB)
        c.matcher().bits()  # the first mask: llguidance builds its lexer lazily
        compile_s.append(time.perf_counter() - t0)
    mask_s, applied_s = [], []
    logits = np.zeros(VOCAB, np.float32)
    for _ in range(repeats):
        m = c.matcher()
        for t in tokens:
            t0 = time.perf_counter()
            m.bits()
            t1 = time.perf_counter()
            m.mask(logits)  # the mask again, unpacked and applied as Decoding applies it
            mask_s.append(t1 - t0)
            applied_s.append(time.perf_counter() - t1)
            assert m.consume(t)
    return {**_row("llguidance", compile_s, mask_s),
            "mask_and_apply_us_mean": round(statistics.fmean(applied_s) * 1e6, 1)}


def bench_xgrammar(pieces: list[bytes], schema: dict, tokens: list[int], repeats: int) -> dict:
    import xgrammar as xg

    info = xg.TokenizerInfo(pieces, xg.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS])
    compile_s = []
    for _ in range(repeats):
        compiler = xg.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        compile_s.append(time.perf_counter() - t0)
    bitmask = xg.allocate_token_bitmask(1, VOCAB)
    mask_s = []
    for _ in range(repeats):
        m = xg.GrammarMatcher(compiled)
        for t in tokens:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - t0)
            assert m.accept_token(t), f"xgrammar refused token {t} ({pieces[t]!r})"
    return _row("xgrammar", compile_s, mask_s)


def _row(engine: str, compile_s: list[float], mask_s: list[float]) -> dict:
    us = sorted(x * 1e6 for x in mask_s)
    return {"engine": engine, "compile_ms": round(statistics.median(compile_s) * 1e3, 3),
            "mask_us_mean": round(statistics.fmean(us), 1), "mask_us_p50": round(us[len(us) // 2], 1),
            "mask_us_p99": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1), "tokens": len(mask_s)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", default="shipped,full", help="vocabularies: shipped, full (default both)")
    p.add_argument("--schemas", default=",".join(SCHEMAS), help=f"of {', '.join(SCHEMAS)} (default all)")
    p.add_argument("--repeats", type=positive_int, default=3, help="compiles and walks per schema (default 3)")
    p.add_argument("--no-xgrammar", action="store_true", help="llguidance only (xgrammar needs torch)")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    vocabs = args.vocab.split(",")
    schemas = args.schemas.split(",")
    for v in vocabs:
        if v not in ("shipped", "full"):
            p.error(f"argument --vocab: {v!r} is not shipped or full")
    for s in schemas:
        if s not in SCHEMAS:
            p.error(f"argument --schemas: {s!r} is not one of {', '.join(SCHEMAS)}")
    base = shipped_pieces()
    rows = []
    print("| vocabulary | real tokens | schema | engine | compile ms | mask µs mean | p50 | p99 | mask + apply µs | "
          "tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in vocabs:
        pieces = base if v == "shipped" else full_pieces(base, VOCAB)
        # the shipped vocabulary as the server reads it (tokenizer.json, masks VOCAB wide); the full one from its pieces
        lt = grammar.grammar_tokenizer(default_model_dir(), VOCAB, [EOS]) if v == "shipped" else llg_tokenizer(pieces)
        for name in schemas:
            tokens = answer_tokens(grammar.json_schema(lt, SCHEMAS[name], VOCAB), seed=0)
            found = [bench_llguidance(lt, SCHEMAS[name], tokens, args.repeats)]
            if not args.no_xgrammar:
                found.append(bench_xgrammar(pieces, SCHEMAS[name], tokens, args.repeats))
            for r in found:
                r = {"vocabulary": v, "real_tokens": len(pieces), "schema": name, **r}
                rows.append(r)
                print(f"| {v} | {len(pieces)} | {name} | {r['engine']} | {r['compile_ms']} | {r['mask_us_mean']} | "
                      f"{r['mask_us_p50']} | {r['mask_us_p99']} | {r.get('mask_and_apply_us_mean', '')} | "
                      f"{r['tokens']} |", flush=True)
    if args.json:
        from ernie_paddle.atomic import write_json

        import llguidance

        from ernie_paddle.benchmarking.setups import machine_meta

        meta = machine_meta(1, vocab_size=VOCAB, llguidance=llguidance.__version__)
        if not args.no_xgrammar:
            from importlib.metadata import version

            meta["xgrammar"] = version("xgrammar")
        write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

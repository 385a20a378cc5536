"""Token generation for the Paddle model and the ONNX runtime: greedy and sampling, streaming, and padded batches.

The model runs a prefill over the prompts, padded on the right as onnxruntime-genai pads them, into a
preallocated KV cache, then one token per step with explicit positions. Token choice (repetition penalty, temperature, top-k, top-p) happens on the
host in numpy on float32 logits, so it is the same code whatever device computed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ernie_paddle import logits_processing
from ernie_paddle.causal_lm import Cache, CausalLM
from ernie_paddle.errors import InputError


@dataclass
class GenerationConfig:
    """What `generate` does; `validate()` names the argument at fault."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] | None = None  # None: the model config's eos ids
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    vocab_limit: int | None = None  # ids >= this are never chosen (embedding rows beyond the tokenizer)
    prefill_chunk: int = 512  # prompt tokens per prefill pass: bounds the [chunk x context] attention scores
    presence_penalty: float = 0.0  # the OpenAI API's logit rules (logits_processing): over the generated tokens
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id: value added to its logit
    min_tokens: int = 0  # the ids that end a sequence are masked until this many tokens are generated
    constraint: Any = None  # grammar.Constraint: each sequence's tokens follow its grammar, ending where it ends

    def stops(self, config_eos: Sequence[int]) -> frozenset[int]:
        """The ids that end a sequence: `eos_token_ids` (config.json's when None) and `stop_token_ids`."""
        eos = self.eos_token_ids if self.eos_token_ids is not None else config_eos
        return frozenset(eos) | frozenset(self.stop_token_ids)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        logits_processing.check_rules(self)


def generation_settings(vocab_size: int, tokenizer=None, stop_token_ids: Sequence[int] = (), **values
                        ) -> GenerationConfig:
    """The settings of a request, as every command line and the server make them: the given stop ids and, for a
    model with a tokenizer, the tokenizer's end generation, and embedding rows past its vocabulary are never chosen.
    `values` are GenerationConfig's other fields (those not given keep its defaults); validated."""
    stops = tuple(stop_token_ids)
    usable = None
    if tokenizer is not None:
        stops += tuple(tokenizer.stop_ids())
        usable = tokenizer.vocab_limit(vocab_size)
    gen = GenerationConfig(stop_token_ids=stops, vocab_limit=usable, **values)
    gen.validate()
    return gen


def logits_numpy(out) -> np.ndarray:
    """The logits of a model call as numpy: Paddle returns a Tensor, the ONNX runtime already an array."""
    return np.asarray(out.logits.numpy() if hasattr(out.logits, "numpy") else out.logits)


def process_logits(logits: np.ndarray, history: list[np.ndarray], gen: GenerationConfig) -> np.ndarray:
    """Apply repetition penalty, temperature, top-k and top-p to logits [B, V]; filtered entries become -inf."""
    x = logits.astype(np.float32, copy=True)
    if gen.vocab_limit is not None:
        x[:, gen.vocab_limit:] = -np.inf
    if gen.repetition_penalty != 1.0:  # the CTRL / transformers rule: shrink seen tokens toward "less likely"
        for b, seen in enumerate(history):
            ids = np.unique(seen)
            s = x[b, ids]
            x[b, ids] = np.where(s > 0, s / gen.repetition_penalty, s * gen.repetition_penalty)
    if not gen.do_sample:
        return x
    x /= np.float32(gen.temperature)
    if gen.top_k and gen.top_k < x.shape[-1]:
        kth = np.partition(x, -gen.top_k, axis=-1)[:, -gen.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if gen.top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, axis=-1)
        p = np.exp(sorted_x - sorted_x[:, :1])
        p /= p.sum(axis=-1, keepdims=True)
        before = np.cumsum(p, axis=-1) - p  # mass strictly before each token
        remove_sorted = before >= gen.top_p  # always keeps the most likely token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        x = np.where(remove, -np.inf, x)
    return x


def choose(x: np.ndarray, gen: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of processed logits [B, V]: argmax, or a draw from softmax."""
    if not gen.do_sample:
        return x.argmax(axis=-1)
    p = np.exp(x - x.max(axis=-1, keepdims=True), dtype=np.float64)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def next_tokens(logits: np.ndarray, history: list[np.ndarray], gen: GenerationConfig,
                rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of logits [B, V]: `process_logits` then `choose`. Greedy decoding without a
    repetition penalty takes the argmax over the usable vocabulary directly (the same token, without a copy)."""
    if gen.do_sample or gen.repetition_penalty != 1.0:
        return choose(process_logits(logits, history, gen), gen, rng)
    return logits[:, :gen.vocab_limit].argmax(axis=-1)


def check_prompt(model: CausalLM, prompt: Sequence[int], max_new_tokens: int, context: int, what: str = "prompt",
                 budget: str = "max_new_tokens") -> np.ndarray:
    """The prompt as int64 ids, checked: not empty, every id in the model's vocabulary, and the prompt with its new
    tokens within `context`. Errors name the prompt (`what`) and the setting that spends the context (`budget`)."""
    a = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if a.size == 0:
        raise InputError(f"{what} is empty: generation needs at least one input token")
    model.check_ids(a[None])
    need = a.size + max_new_tokens
    if need > context:
        raise InputError(f"{what} of {a.size} tokens + {budget} {max_new_tokens} = {need} exceeds the context of "
                         f"{context} tokens")
    return a


class Decoding:
    """One sequence's decoding rules, shared by `stream_batch` and the serving engine: its generator, the ids that
    stop it, the history (kept only when the repetition penalty reads it) and the stop/length rule."""

    def __init__(self, prompt: np.ndarray, gen: GenerationConfig, config_eos: Sequence[int],
                 rng: np.random.Generator | None = None):
        self.gen = gen
        self.stops = gen.stops(config_eos)
        self.rng = rng if rng is not None else np.random.default_rng(gen.seed)
        self.history = np.asarray(prompt, np.int64)
        self.generated = 0
        self.finish: str | None = None  # "stop" or "length" once the sequence has ended
        self.rules = logits_processing.LogitRules(gen, self.stops) if logits_processing.wanted(gen) else None
        self.matcher = gen.constraint.matcher() if gen.constraint is not None else None  # grammar.Matcher

    def choose(self, logits: np.ndarray) -> int:
        """The next token from this sequence's logits [V]."""
        if self.rules is not None:
            logits = self.rules.apply(logits, self.generated)
        if self.matcher is not None:
            logits = self.matcher.mask(logits)
        return int(next_tokens(logits[None], [self.history], self.gen, self.rng)[0])

    def accept(self, token: int) -> bool:
        """Record a chosen token; True when it ends the sequence (`finish` says why)."""
        if self.gen.repetition_penalty != 1.0:  # the only reader of the history
            self.history = np.append(self.history, token)
        self.generated += 1
        if self.rules is not None:
            self.rules.accept(token)
        if token in self.stops:
            self.finish = "stop"
        elif self.matcher is not None and (not self.matcher.consume(token) or self.matcher.done):
            self.finish = "stop"  # the grammar is complete (or, never expected, refused a token)
        elif self.generated >= self.gen.max_new_tokens:
            self.finish = "length"
        return self.finish is not None


def prefill(model: CausalLM, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Cache, chunk: int,
            lengths: np.ndarray | None = None, start: int = 0) -> np.ndarray:
    """Run right-padded prompts into the cache `chunk` tokens at a time, from token `start` on (the cache already
    holds every row's first `start`); returns float32 logits [B, V] at each row's last real token (`lengths`,
    default: every row full), which must come after `start`.

    Attention scores of one pass are [heads x chunk x cached tokens]: at a 32K-token context a single pass would
    need tens of GB, chunks of 512 a few hundred MB, for the same result. A model whose `chunked_prefill_max_batch`
    is below the batch size (ONNX Runtime's GroupQueryAttention takes several new tokens over a past for batch 1
    only) gets the whole prompt in one pass. A pass asks for every position's logits only when a row ends inside it
    and not on its last token.
    """
    b, t = ids.shape
    last = np.full(b, t - 1) if lengths is None else np.asarray(lengths) - 1
    if model.chunked_prefill_max_batch is not None and b > model.chunked_prefill_max_batch:
        chunk = t
    logits: list[np.ndarray | None] = [None] * b
    for s in range(start, t, chunk):
        e = min(s + chunk, t)
        ends = np.flatnonzero((last >= s) & (last < e))
        last_only = bool(np.all(last[ends] == e - 1))
        out = logits_numpy(model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e],
                                 cache=cache, last_only=last_only))
        for i in ends:
            logits[i] = out[i, -1] if last_only else out[i, last[i] - s]
    return np.stack(logits).astype(np.float32, copy=False)


def right_padded(rows: Sequence[np.ndarray], pad: int, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, longest], attention_mask [B, total], positions [B, longest]) of prompts padded on the right, as
    onnxruntime-genai pads a batch: row i's tokens sit at slots 0..len-1 and its mask counts them, so a model that
    reads per-row lengths from the mask (GroupQueryAttention's seqlens_k) and one that masks keys (Paddle, the
    portable graph) see the same sequences. Pads get the row's last position; their outputs are never read."""
    b, longest = len(rows), max(len(r) for r in rows)
    ids = np.full((b, longest), pad, dtype=np.int64)
    mask = np.zeros((b, total), dtype=np.int64)  # int64 as the graphs take it: no conversion per step
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    positions = np.maximum(np.cumsum(mask[:, :longest], axis=1) - 1, 0)
    return ids, mask, positions


class PrefillHook(Protocol):
    """Work `stream_batch` hands out around its prefill (`prompt_cache.PromptCache` is one): a prefix of the prompts
    whose keys and values are known already goes into the fresh cache instead of being run again, and the cache is
    handed back once it holds every prompt token, for the hook to keep what the prefill computed."""

    def reuse(self, model: CausalLM, cache: Cache, prompts: list[np.ndarray]) -> int:
        """Write the KV of every prompt's first n tokens into the empty `cache` and return n (0: nothing known); n
        must be below every prompt's length, since the last prompt token runs for its logits."""

    def prefilled(self, model: CausalLM, cache: Cache, prompts: list[np.ndarray]) -> None:
        """`cache` holds every prompt's tokens at its first slots. Called once the sequences have ended (decoding
        writes only later slots), so the hook's work delays no token; not called if the caller stops early."""


def stream_batch(model: CausalLM, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None,
                 hook: PrefillHook | None = None) -> Iterator[list[int | None]]:
    """Yield, each step, the new token of every prompt (None once that prompt has finished). `hook`: a prefix to
    start the prefill from and a taker of the prefilled cache; with one, the prompts are prefilled even for 0 new
    tokens (keeping their KV is then the point)."""
    gen = gen or GenerationConfig()
    gen.validate()
    if len(prompts) == 0:
        raise InputError("no prompts given")
    limit = model.config.max_position_embeddings
    rows = [check_prompt(model, p, gen.max_new_tokens, limit, f"prompt {i}") for i, p in enumerate(prompts)]
    if gen.max_new_tokens == 0 and hook is None:
        return
    b, longest = len(rows), max(len(r) for r in rows)
    lengths = np.array([len(r) for r in rows])
    pad = model.config.pad_token_id
    ids, mask, positions = right_padded(rows, pad, longest + gen.max_new_tokens)
    rng = np.random.default_rng(gen.seed)  # one generator for the batch, drawn from row by row
    seqs = [Decoding(r, gen, model.config.eos_token_ids, rng) for r in rows]
    cache = model.allocate_cache(b, mask.shape[1])

    start = hook.reuse(model, cache, rows) if hook is not None else 0
    if not 0 <= start < lengths.min():
        raise ValueError(f"a prefill hook reused {start} tokens of a {lengths.min()}-token prompt")
    logits = prefill(model, ids, mask[:, :longest], positions, cache, gen.prefill_chunk, lengths, start)
    if gen.max_new_tokens == 0:
        hook.prefilled(model, cache, rows)
        return
    next_pos = lengths[:, None].astype(np.int64)  # each row's next position: its own length
    for step in range(gen.max_new_tokens):
        chosen = [s.choose(row) for s, row in zip(seqs, logits)]  # finished rows draw too: seeded as before
        yield [None if s.finish else t for s, t in zip(seqs, chosen)]
        for s, t in zip(seqs, chosen):
            if not s.finish:
                s.accept(t)
        if all(s.finish for s in seqs):  # (every row has finished by max_new_tokens)
            if hook is not None:
                hook.prefilled(model, cache, rows)
            return
        tokens = np.array([pad if s.finish else t for s, t in zip(seqs, chosen)], np.int64)
        mask[:, longest + step] = 1
        # a graph that derives positions from the mask (the ort flavour) is not given them each step
        out = model(tokens[:, None], attention_mask=mask[:, :longest + step + 1],
                    position_ids=next_pos if model.has_position_ids else None, cache=cache, last_only=True)
        logits = logits_numpy(out)[:, -1]
        next_pos = next_pos + 1


def stream(model: CausalLM, prompt: Sequence[int], gen: GenerationConfig | None = None,
           hook: PrefillHook | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (the eos token, if produced, is the last)."""
    for step in stream_batch(model, [prompt], gen, hook):
        yield step[0]


def generate(model: CausalLM, prompts: Sequence[Sequence[int]] | Sequence[int], gen: GenerationConfig | None = None,
             hook: PrefillHook | None = None) -> list[list[int]] | list[int]:
    """New tokens for one prompt (a list of ids) or for a batch of prompts (a list of lists)."""
    single = len(prompts) > 0 and np.ndim(prompts[0]) == 0
    batch = [prompts] if single else prompts
    out: list[list[int]] = [[] for _ in batch]
    for step in stream_batch(model, batch, gen, hook):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out[0] if single else out

"""The evaluation API of /v1/completions: prompt lists, `n` choices, and `echo` with the prompt's scores.

What evaluation harnesses (lm-evaluation-harness's `local-completions`) send: several prompts per request, each as
text or token ids (`[[ids]]` is one prompt), with `echo: true, logprobs: k, max_tokens: 1` (or 0: score only). Each
prompt and each of its `n` samples is one engine request; the answer's `choices` are in prompt order, the samples of
one prompt together, `index` counting them all (prompt p's sample j is choice p * n + j). With a `seed`, sample j of
every prompt decodes with seed + j, so a prompt's first sample is what the same request alone gives, and the others
are independent draws; without one each sample has its own unseeded generator.

`echo` puts the prompt before the generated text. With `logprobs`, the prompt's tokens come first in `logprobs`:
the first token's log-probability and alternatives are null (nothing precedes it), every later one has its
log-probability under the model given the tokens before it, and a `{token: logprob}` dict of the k most likely
tokens that holds the token itself with the same float. These scores come from the request's own prefill, every
position computed (`prompt_scoring`: a scored request takes nothing from the prefix cache). Then come the generated
tokens as without echo, so with `max_tokens: 1` the list is the prompt's tokens and exactly one generated token.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable, Callable, Sequence

from ernie_paddle.serving.responses import completion_logprobs, usage
from ernie_paddle.serving.text import TokenText
from ernie_paddle.text.tokenizer import IncrementalDecoder

MAX_N = 128  # the most choices per prompt (as OpenAI bounds n)


def _error(message: str, param: str):
    from ernie_paddle.serving.protocol import ApiError  # (protocol imports this module)

    return ApiError(400, message, param)


# ---- requests ------------------------------------------------------------------------------------------------------
def prompt_values(value: Any) -> list:
    """The prompts of a completions body, each still unchecked: a list of texts or of id lists is several prompts
    (one of them: one prompt), anything else one prompt. An empty list is refused."""
    if isinstance(value, list) and not value:
        raise _error("prompt is an empty list: give at least one prompt (text or token ids)", "prompt")
    if isinstance(value, list) and all(isinstance(v, (str, list)) for v in value):
        return value
    return [value]


def attach_completion(job, body: dict, prompts: list[list[int]], max_tokens: int | None, model) -> None:
    """Set a completions Job's `echo`, its prompts and `n`; `max_tokens` 0 (score only) needs echo."""
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _error(f"echo must be true or false, got {_show(echo)}", "echo")
    if echo and job.stream:
        raise _error("echo is not supported with \"stream\": true (the prompt's scores come in one answer)", "echo")
    if max_tokens == 0:
        if not echo:
            raise _error("max_tokens 0 (score the prompt only) needs \"echo\": true", "max_tokens")
        job.gen = dataclasses.replace(job.gen, max_new_tokens=0)
        job.max_tokens_param = "max_tokens"
    job.echo, job.prompts = bool(echo), prompts
    attach_n(job, body, model)


def attach_n(job, body: dict, model) -> None:
    """Set a Job's `n`, checked: at most MAX_N, n times a given max_tokens within the context, no stream of several
    choices."""
    n = body.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise _error(f"n must be an integer in [1, {MAX_N}], got {_show(n)}", "n")
    prompts = len(job.prompts) if job.prompts else 1
    if job.stream and (n > 1 or prompts > 1):
        what, param = (f"n {n}", "n") if n > 1 else (f"{prompts} prompts", "prompt")
        raise _error(f"{what} with \"stream\": true is not supported (several choices are answered whole)", param)
    tokens = job.gen.max_new_tokens
    if job.max_tokens_param and n * tokens > model.max_len:
        raise _error(f"n {n} x {job.max_tokens_param} {tokens} = {n * tokens} exceeds the context of {model.max_len} "
                     f"tokens", "n")
    job.n = n


def choices(job) -> list:
    """One Job per choice: each prompt's `n` samples in turn, sample j seeded with seed + j."""
    out = []
    for prompt in job.prompts or [job.prompt]:
        for j in range(job.n):
            seed = None if job.gen.seed is None else job.gen.seed + j
            gen = job.gen if seed == job.gen.seed else dataclasses.replace(job.gen, seed=seed)
            out.append(dataclasses.replace(job, prompt=prompt, gen=gen, prompts=[prompt], n=1))
    return out


# ---- answers -------------------------------------------------------------------------------------------------------
class Choices:
    """The Generations of one request's choices, submitted and cancelled together."""

    def __init__(self, gens: list, n: int):
        self.gens, self.n = gens, n

    def submit(self) -> None:
        """Queue every choice; if one is refused (a full queue ...), those queued before are cancelled."""
        try:
            for g in self.gens:
                g.submit()
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        for g in self.gens:
            g.cancel()

    @property
    def usage(self) -> dict:
        """Prompt tokens once per prompt (its first sample's), completion tokens of every choice."""
        first = self.gens[::self.n]
        return usage(sum(g.prompt_tokens for g in first), sum(g.completion_tokens for g in self.gens),
                     sum(g.request.cached_tokens for g in first))

    async def whole(self, head, one: Callable[[Any, Any], Awaitable[dict]], tokenizer) -> dict:
        """The answer: `one(gen, head)` (a single choice's whole answer) for every choice at once, merged."""
        try:
            answers = await asyncio.gather(*(one(g, head) for g in self.gens))
        except BaseException:
            self.cancel()
            raise
        out = []
        for i, (g, answer) in enumerate(zip(self.gens, answers)):
            choice = answer["choices"][0]
            choice["index"] = i
            if g.job.echo:
                echo(choice, g.job.prompt, g.request.prompt_scores, tokenizer)
            out.append(choice)
        return head.wrap(out, self.usage)


def echo(choice: dict, prompt: Sequence[int], scores: list, tokenizer) -> None:
    """Put the prompt before a completion choice's text, and its tokens before its logprobs (if it has them)."""
    logprobs = choice.get("logprobs")
    text, tokens = prompt_tokens(tokenizer, prompt, scores if logprobs is not None else None)
    choice["text"] = text + choice["text"]
    if logprobs is not None:
        before = completion_logprobs(tokens)
        shifted = dict(logprobs, text_offset=[o + len(text) for o in logprobs["text_offset"]])
        choice["logprobs"] = {key: before[key] + shifted[key] for key in before}


def prompt_tokens(tokenizer, prompt: Sequence[int], scores: list | None) -> tuple[str, list[TokenText]]:
    """The prompt's text (special tokens kept) and its tokens as logprobs show them: each token's string after the
    one before, its offset, and with `scores` (prompt_scoring.Score of tokens 1..) its logprob and top dict."""
    decoder = IncrementalDecoder(tokenizer, (), skip_special_tokens=False)
    offset, out, previous = 0, [], None
    for i, token in enumerate(prompt):
        entry = TokenText(int(token), _string(tokenizer, previous, token), offset)
        if scores is not None and i > 0:
            logprob, top = scores[i - 1]
            entry.logprob = logprob
            entry.top = {_string(tokenizer, previous, j): p for j, p in top}
            entry.top[entry.string] = logprob  # the token's own value, the same float as its token_logprobs
        out.append(entry)
        offset += len(decoder.push(token))
        previous = token
    return tokenizer.decode(prompt), out


def _string(tokenizer, previous: int | None, token: int) -> str:
    """A token's text after the token before it (so a word-initial space shows), special tokens included."""
    if previous is None:
        return tokenizer.decode([token])
    before = tokenizer.decode([previous])
    both = tokenizer.decode([previous, token])
    return both[len(before):] if both.startswith(before) else tokenizer.decode([token])


def _show(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."

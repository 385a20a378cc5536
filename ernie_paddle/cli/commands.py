"""The generate and logits commands, the checks before a model loads, and the runner of every command line.

Shared by `ernie-paddle`, `ernie-onnx` and `tools/dist_generate`: each passes the function that loads its model.
Everything the arguments decide (token ids against config.json's vocabulary, sampling values, the prompt and its
tokenizer) is checked before that function runs, so bad input never waits for a model to load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ernie_paddle.text.chat_output import ChatFormat, ChatOutputParser, ModelOutputWarning, parse_chat_output
from ernie_paddle.cli.args import DECODING, MAX_NEW_TOKENS_IDS, MAX_NEW_TOKENS_TEXT, SAMPLING, sampling_given
from ernie_paddle.errors import ConfigDefaultWarning, InputError
from ernie_paddle.interrupts import raise_if_interrupted, run_command
from ernie_paddle.sysinfo import peak_rss
from ernie_paddle.textfile import read_text

Load = Callable[[argparse.Namespace], Any]  # the model for these arguments (Paddle, ONNX Runtime, distributed)
ONE_LINE_WARNINGS = (ConfigDefaultWarning, ModelOutputWarning)  # the user's to read, not a programmer's


# ---- the runner ----------------------------------------------------------------------------------------------------
def run(argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """Parse `argv` and run the chosen command under `run_command`: bad input is one `error:` line and status 2,
    an unreadable or unwritable file status 1; Ctrl-C, SIGTERM and a closed stdout end with 130, 143 and 141.
    Config-default and model-output warnings print as one `warning:` line while it runs."""
    return run_command(lambda: _run(list(argv), parser), parser.prog)


def _run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    for category in ONE_LINE_WARNINGS:
        warnings.simplefilter("always", category)
    try:
        return args.func(args)  # errors become one line and a status in run_command
    finally:
        warnings.showwarning = _python_showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Config-default and model-output warnings as one plain line; others as Python prints them."""
    if issubclass(category, ONE_LINE_WARNINGS):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


# ---- checks before loading -----------------------------------------------------------------------------------------
def folder_config(args: argparse.Namespace):
    """config.json of --model, read without its default-value warnings (the model's own load reports them)."""
    from ernie_paddle.config import ErnieConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDefaultWarning)
        return ErnieConfig.from_file(args.model, strict=getattr(args, "strict_config", False))


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Every id must index the embedding of config.json's vocabulary; the error names the argument."""
    from ernie_paddle.token_ids import check_token_ids
    import numpy as np

    try:
        check_token_ids(np.asarray(ids, dtype=np.int64), vocab_size)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


@dataclass
class Prompt:
    ids: list[int]
    tokenizer: Any = None  # ErnieTokenizer for text prompts (the output is streamed as text)
    echo: str | None = None  # printed before the continuation: a short --prompt, never ids, files or --json
    chat: ChatFormat | None = None  # --chat: how the answer splits into reasoning, content and tool calls
    reasoning_open: bool = False  # --chat: the prompt ends inside <think>, so the answer starts with reasoning
    show_reasoning: bool = False  # --show-reasoning: print the reasoning too (on stderr)


def read_prompt(args: argparse.Namespace, vocab_size: int) -> Prompt:
    """The prompt's token ids, from --input-ids, --prompt or --prompt-file; with --chat, the prompt as a user message
    (after --system's) in the checkpoint's chat template, with --tools."""
    chat_flags = [flag for flag, given in (("--system", args.system is not None), ("--tools", args.tools is not None),
                                           ("--show-reasoning", args.show_reasoning)) if given]
    if chat_flags and not args.chat:
        raise InputError(f"{chat_flags[0]} needs --chat (it is for the chat template)")
    text = args.prompt
    if args.prompt_file is not None:
        text = read_text(args.prompt_file, f"--prompt-file {args.prompt_file}")
    if text is None:
        if args.chat:
            raise InputError("--chat needs --prompt (the chat template is text)")
        check_ids(args.input_ids, vocab_size, "--input-ids")
        return Prompt(list(args.input_ids))
    from ernie_paddle.text.tokenizer import ErnieTokenizer

    tok = ErnieTokenizer(args.model)
    echo = None if args.json or args.prompt_file is not None else ("" if args.chat else text)
    if not args.chat:
        ids = tok.encode(text)
        if not ids:
            raise InputError(f"{'--prompt-file' if args.prompt_file else '--prompt'} is empty: give some text to "
                             f"continue")
        return Prompt(ids, tok, echo)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    rendered = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tools=args.tools,
                                       tokenize=False)
    chat = ChatFormat.of(tok)
    return Prompt(tok.encode(rendered), tok, echo, chat, chat.opens_reasoning(rendered), args.show_reasoning)


def generation_config(args: argparse.Namespace, prompt: Prompt, cfg):
    """The validated GenerationConfig of the arguments; sampling flags without --do-sample get a warning."""
    from ernie_paddle.generation import generation_settings

    stops = list(args.stop_ids or ())
    check_ids(stops, cfg.vocab_size, "--stop-ids")
    given = sampling_given(args)
    if given and not args.do_sample:
        print(f"warning: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without --do-sample "
              f"(decoding is greedy)", file=sys.stderr)
    given_values = {k: getattr(args, k) for k in SAMPLING + DECODING if getattr(args, k) is not None}
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = MAX_NEW_TOKENS_TEXT if prompt.tokenizer else MAX_NEW_TOKENS_IDS
    if getattr(args, "json_schema", None) is not None:  # the server's response_format json_schema, from a file
        from ernie_paddle.grammar import folder_schema

        given_values["constraint"] = folder_schema(args.model, args.json_schema, cfg.vocab_size, "--json-schema")
    return generation_settings(cfg.vocab_size, prompt.tokenizer, stops, max_new_tokens=max_new,
                               do_sample=args.do_sample, **given_values)  # flags not given: the defaults


# ---- the commands --------------------------------------------------------------------------------------------------
def generate(load: Load, args: argparse.Namespace) -> int:
    """Generate from --input-ids (prints the new ids) or text (streams text; with --chat the answer); --json: one
    object at the end, whose "token_ids" holds the new tokens only (and "text" the decoded continuation of a text
    prompt; with --chat "reasoning", "content" and "tool_calls" too); "cached_tokens" counts the prompt tokens
    --prompt-cache supplied."""
    cfg = folder_config(args)
    prompt = read_prompt(args, cfg.vocab_size)
    gen = generation_config(args, prompt, cfg)
    cache = _prompt_cache(args)
    model = load(args)
    new, first, seconds = _stream(model, prompt, gen, args.json, cache)
    cached = cache.cached_tokens if cache else 0
    if args.json:
        print(json.dumps({**_summary(prompt, new, first, seconds), "cached_tokens": cached}))
    else:
        print(flush=True)
        print(f"[prompt {len(prompt.ids)} tokens{f' ({cached} from the prompt cache)' if cached else ''}, "
              f"generated {len(new)} tokens, "
              f"{len(new) / max(seconds, 1e-9):.2f} tokens/s, first token after {first:.2f}s, "
              f"peak RSS {peak_rss() / 2**30:.2f} GiB]", file=sys.stderr)
    return 0


def _prompt_cache(args: argparse.Namespace):
    """The PromptCache of --prompt-cache (None without it; dist_generate has no such flag), its file checked."""
    path = getattr(args, "prompt_cache", None)
    if path is None:
        return None
    from ernie_paddle.prompt_cache import PromptCache

    cache = PromptCache(path)
    cache.check()
    return cache


def _stream(model, prompt: Prompt, gen, quiet: bool, hook=None) -> tuple[list[int], float, float]:
    """Run generation, printing tokens (or text; a chat's answer) as they come unless `quiet`; returns (new ids,
    TTFT, seconds).

    The prompt is echoed with the first token, so an error raised before it (a prompt too long for the model)
    stands on its own line."""
    from ernie_paddle.generation import stream
    from ernie_paddle.text.tokenizer import IncrementalDecoder

    decoder = show = None
    if prompt.tokenizer and not quiet:
        decoder = IncrementalDecoder(prompt.tokenizer, prompt.ids, keep=prompt.chat.tags if prompt.chat else ())
        show = _ChatPrinter(prompt) if prompt.chat else lambda text: print(text, end="", flush=True)
    t0, new, first = time.time(), [], None
    for t in stream(model, prompt.ids, gen, hook):
        raise_if_interrupted()  # a step boundary: where a lost Ctrl-C / SIGTERM takes effect
        if first is None:
            first = time.time() - t0
            print(prompt.echo or "", end="", flush=True)
        new.append(t)
        if decoder:
            show(decoder.push(t))
        elif not quiet:
            print(t, end=" ", flush=True)
    if first is None:  # no new token (--max-new-tokens 0)
        print(prompt.echo or "", end="", flush=True)
    if isinstance(show, _ChatPrinter):
        show.finish()
    return new, first or 0.0, time.time() - t0


class _ChatPrinter:
    """Prints a chat answer as it streams: content on stdout, each tool call as a `tool call: {json}` line, and with
    --show-reasoning the reasoning on stderr."""

    def __init__(self, prompt: Prompt):
        self.parser = ChatOutputParser(prompt.chat, prompt.reasoning_open)
        self.show_reasoning, self.in_reasoning = prompt.show_reasoning, False

    def __call__(self, text: str) -> None:
        self._print(self.parser.push(text))

    def finish(self) -> None:
        self._print(self.parser.finish())
        self._end_reasoning()

    def _print(self, delta) -> None:
        if delta.reasoning and self.show_reasoning:
            if not self.in_reasoning:
                print("[reasoning] ", end="", file=sys.stderr)
            self.in_reasoning = True
            print(delta.reasoning, end="", file=sys.stderr, flush=True)
        if delta.content or delta.tool_calls:
            self._end_reasoning()
        print(delta.content, end="", flush=True)
        for call in delta.tool_calls:
            print(f"tool call: {json.dumps(call, ensure_ascii=False)}", flush=True)

    def _end_reasoning(self) -> None:
        if self.in_reasoning:
            print(file=sys.stderr, flush=True)
            self.in_reasoning = False


def _summary(prompt: Prompt, new: list[int], first: float, seconds: float) -> dict:
    out = {"token_ids": new, "prompt_tokens": len(prompt.ids), "generated_tokens": len(new),
           "seconds": round(seconds, 4), "first_token_seconds": round(first, 4),
           "decode_tokens_per_s": round((len(new) - 1) / (seconds - first), 3) if len(new) > 1 else None,
           "peak_rss_gib": round(peak_rss() / 2**30, 3)}
    if prompt.tokenizer is not None:
        out["text"] = prompt.tokenizer.decode(new, skip_special_tokens=True)
    if prompt.chat is not None:
        answer = parse_chat_output(prompt.tokenizer.decode(new, skip_special_tokens=True, keep=prompt.chat.tags),
                                   prompt.chat, prompt.reasoning_open)
        out.update(reasoning=answer.reasoning, content=answer.content, tool_calls=answer.tool_calls)
    return out


def logits(load: Load, args: argparse.Namespace) -> int:
    """Write float32 [T, vocab] logits of one forward pass (no cache) to --out, all or nothing."""
    import numpy as np

    from ernie_paddle.atomic import atomic_path

    check_ids(args.input_ids, folder_config(args).vocab_size, "--input-ids")
    values = load(args).logits(np.asarray(args.input_ids, dtype=np.int64)).astype(np.float32)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, values)
    print(f"wrote {args.out}: float32 {list(values.shape)}", file=sys.stderr)
    return 0

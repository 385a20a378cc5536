"""Arguments shared by the command lines (`ernie-paddle`, `ernie-onnx`, `dist_generate`): types and groups.

Each type function checks one value as argparse reads it, so bad input ends with argparse's one line
`PROG: error: argument --x: ...` and exit status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

from . import files
from .errors import InputError
from .interrupts import raise_if_interrupted
from .precisions import DTYPES, check_block_size
from .sizes import parse_size


def default_model_dir() -> str:
    """The small trained ERNIE-architecture model that ships inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "ernie-4.5-shakespeare")


# ---- argument types ------------------------------------------------------------------------------------------------
def token_ids(text: str) -> list[int]:
    """Comma-separated ids, or `@FILE`: ids separated by commas or whitespace in a file (long prompts)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise argparse.ArgumentTypeError(f"cannot read token ids from {text[1:]}: {e}") from None
    if not text.strip():
        raise argparse.ArgumentTypeError("no token ids given; expected comma-separated integers like 1,2,3")
    if re.search(r"(^|,)\s*(,|$)", text.strip()):
        raise argparse.ArgumentTypeError(f"an empty id between commas (or at an end) in {text[:80]!r}; expected "
                                         f"comma-separated integers like 1,2,3")
    try:
        ids = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text[:80]!r}") from None
    return ids


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: layers, tokens of context, batch, threads)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (random seeds, token counts that may be zero)."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def size(text: str) -> int:
    """Bytes: "24GB" (24e9), "24GiB" (24 * 2**30), "500MB" (one parser for every size: `sizes.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def block_size(text: str) -> int:
    """A quantisation block size, by the exporter's rule (`precisions.check_block_size`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        check_block_size(value)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def folder(text: str) -> str:
    """An existing folder (a checkpoint or an exported model)."""
    if not text:
        raise argparse.ArgumentTypeError("the folder name is empty")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: not a folder (give the folder that holds {files.CONFIG})")
    return text


def output_file(text: str) -> str:
    """A file to write (replaced if it exists): not empty, not a folder."""
    if not text:
        raise argparse.ArgumentTypeError("the file name is empty")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give a file name")
    return text


def input_file(text: str) -> str:
    """An existing file to read."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: " + ("not a file" if os.path.exists(text) else "no such file"))
    return text


# ---- argument groups -----------------------------------------------------------------------------------------------
SAMPLING = ("temperature", "top_p", "top_k", "seed")  # default None: not given, GenerationConfig's default applies


def model_arg(p: argparse.ArgumentParser, required: bool = False, help: str | None = None,
              checked: bool = True) -> None:
    """--model: a checkpoint folder (default: the shipped model); `checked`: refused at once unless a folder."""
    kind = folder if checked else str
    if required:
        p.add_argument("--model", required=True, type=kind, help=help)
    else:
        p.add_argument("--model", default=default_model_dir(), type=kind, help=help or
                       "checkpoint folder (-Paddle or -PT layout); default: the shipped Shakespeare model")


def dtype_arg(p: argparse.ArgumentParser, default: str, help: str | None = None) -> None:
    p.add_argument("--dtype", default=default, choices=DTYPES, help=help)


def generate_args(g: argparse.ArgumentParser) -> None:
    """The generate arguments: one contract for ernie-paddle, ernie-onnx and dist_generate."""
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-ids", type=token_ids, help="prompt token ids, e.g. 1,2,3, or @FILE (prints the new ids)")
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer; streams text)")
    src.add_argument("--prompt-file", help="read the prompt text from this UTF-8 file (long contexts)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the ERNIE chat template")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 32 for --input-ids, 128 for --prompt")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="with --do-sample (default 1.0: no top-p filter)")
    g.add_argument("--top-k", type=int, default=None, help="with --do-sample (default 0: no top-k filter)")
    g.add_argument("--seed", type=non_negative_int, default=None, help="with --do-sample (default: a random draw)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop-ids", type=token_ids, default=None, help="extra token ids that end generation")
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per prefill pass (bounds attention memory at long contexts; default 512)")
    g.add_argument("--json", action="store_true", help='print one JSON object; "token_ids" holds the new tokens')


def sampling_given(args: argparse.Namespace) -> list[str]:
    """The sampling flags the user gave (they do nothing without --do-sample)."""
    return [f"--{k.replace('_', '-')}" for k in SAMPLING if getattr(args, k) is not None]


def logits_args(lg: argparse.ArgumentParser) -> None:
    lg.add_argument("--input-ids", type=token_ids, required=True)
    lg.add_argument("--out", required=True, type=output_file, help="output .npy file")


def log_line(text: str) -> None:
    """A progress line of a long command on stderr (also a step boundary for a lost Ctrl-C / SIGTERM)."""
    raise_if_interrupted()
    print(text, file=sys.stderr, flush=True)


def progress_printer(label: str) -> Callable[[int, int, str], None]:
    """Progress on stderr: about every 5% and at the end, with elapsed time."""
    t0, last = time.time(), [-1]

    def report(done: int, total: int, name: str) -> None:
        raise_if_interrupted()  # a step boundary: where a lost Ctrl-C / SIGTERM takes effect
        pct = int(100 * done / max(total, 1))
        if pct // 5 != last[0] or done == total:
            last[0] = pct // 5
            print(f"{label}: {done}/{total} tensors ({pct}%), {time.time() - t0:.1f}s  {name}", file=sys.stderr,
                  flush=True)

    return report


# ---- inputs --------------------------------------------------------------------------------------------------------
PARITY_TEXT_PROMPTS = ("ROMEO:\nBut, soft! what light through yonder window breaks?",
                       "First Citizen:\nBefore we proceed any further, hear me speak.", "To be, or not to be:")


def parity_prompts(path: str | None, model_dir: str, vocab_size: int) -> list[list[int]]:
    """`parity --prompts FILE`: one prompt per line, text (needs the tokenizer) or comma-separated ids.

    Without a file: three fixed text prompts when the model has a tokenizer, else three seeded random id prompts.
    """
    from .errors import InputError

    lines = None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--prompts {path}: cannot read it as UTF-8 text ({e})") from None
        if not lines:
            raise InputError(f"--prompts {path}: no prompts in the file")
    tok = None
    if lines is None or not all(map(_is_ids, lines)):
        tok = _parity_tokenizer(model_dir, required=lines is not None)
    if lines is None:
        if tok is None:
            import numpy as np

            rng = np.random.default_rng(0)
            return [rng.integers(3, vocab_size, n).tolist() for n in (8, 16, 32)]
        lines = list(PARITY_TEXT_PROMPTS)
    prompts = [token_ids(ln) if _is_ids(ln) else tok.encode(ln) for ln in lines]
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad or not ids:
            why = f"token id {bad[0]} is out of range for vocab_size {vocab_size}" if bad else "no tokens"
            raise InputError(f"--prompts {path or '(default)'}: prompt {i + 1}: {why}")
    return prompts


def _parity_tokenizer(model_dir: str, required: bool):
    """The model's tokenizer; None when it has none and no prompt needs it."""
    from .errors import TokenizerError
    from .tokenizer import ErnieTokenizer

    try:
        return ErnieTokenizer(model_dir)
    except TokenizerError:
        if required:
            raise
        return None


def _is_ids(line: str) -> bool:
    return all(x.strip().isdigit() for x in line.split(",")) and bool(line.strip())

"""Arguments shared by the command lines (`ernie-paddle`, `ernie-onnx`, `dist_generate`): types and groups.

Each type function checks one value as argparse reads it, so bad input ends with argparse's one line
`PROG: error: argument --x: ...` and exit status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Callable

from ernie_paddle import files
from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig
from ernie_paddle.interrupts import raise_if_interrupted
from ernie_paddle.precisions import DTYPES, check_block_size
from ernie_paddle.sizes import parse_size
from ernie_paddle.textfile import read_text


def default_model_dir() -> str:
    """The small trained ERNIE-architecture model that ships inside the package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ernie_paddle/, above cli/
    return os.path.join(package, "models", "ernie-4.5-shakespeare")


# ---- argument types ------------------------------------------------------------------------------------------------
def token_ids(text: str) -> list[int]:
    """Comma-separated ids, or `@FILE`: ids separated by commas or whitespace in a file (long prompts)."""
    if text.startswith("@"):
        try:
            text = read_text(text[1:], text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
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


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. 128,512 (prompt lengths, batch sizes, context lengths)."""
    try:
        return [positive_int(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 128,512, got {text!r}") \
            from None


def non_negative_int(text: str) -> int:
    """An integer >= 0 (random seeds, token counts that may be zero)."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, low: int, what: str) -> int:
    return _at_least(text, low, int, what, what)


def non_negative_seconds(text: str) -> float:
    """A number of seconds >= 0 (a grace period)."""
    return _at_least(text, 0, float, "a number of seconds", ">= 0 seconds")


def _at_least(text: str, low: float, convert: Callable[[str], float], expected: str, must: str):
    """`convert(text)`, refused with argparse's one-line errors unless it is a number >= low."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not value >= low:
        raise argparse.ArgumentTypeError(f"must be {must}, got {text.strip()}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535 (0: any free port), got {text!r}")
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


def tool_list(path: str) -> list[dict]:
    """A JSON file holding a list of tool definitions (OpenAI style: {"type": "function", "function": {...}})."""
    tools = _json_file(path)
    if not isinstance(tools, list):
        raise argparse.ArgumentTypeError(f"{path}: expected a JSON list of tool definitions, got {_json_kind(tools)}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise argparse.ArgumentTypeError(f"{path}: tool {i + 1} is {_json_kind(tool)}, not an object")
    return tools


def json_schema_file(path: str) -> dict | bool:
    """A JSON file holding a JSON schema (an object, or true / false)."""
    schema = _json_file(path)
    if not isinstance(schema, (dict, bool)):
        raise argparse.ArgumentTypeError(f"{path}: expected a JSON schema object, got {_json_kind(schema)}")
    return schema


def json_schema_arg(g: argparse.ArgumentParser) -> None:
    """--json-schema FILE: the answer is JSON valid against the schema (constrained decoding, as the server's
    response_format)."""
    g.add_argument("--json-schema", metavar="FILE", type=json_schema_file, default=None,
                   help="constrain the answer to JSON valid against the JSON schema in FILE")


def _json_file(path: str):
    """The JSON value in a file; unreadable or not JSON is an argparse error naming it."""
    try:
        return json.loads(read_text(path, path))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{path}: not JSON ({e})") from None


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def input_file(text: str) -> str:
    """An existing file to read."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: " + ("not a file" if os.path.exists(text) else "no such file"))
    return text


# ---- argument groups -----------------------------------------------------------------------------------------------
SAMPLING = ("temperature", "top_p", "top_k", "seed")  # default None: not given, GenerationConfig's default applies
DECODING = ("repetition_penalty", "prefill_chunk")  # likewise, and used by greedy decoding too
MAX_NEW_TOKENS_IDS = GenerationConfig.max_new_tokens  # --max-new-tokens of an --input-ids prompt
MAX_NEW_TOKENS_TEXT = 128  # of a text prompt: a few lines of text


def model_arg(p: argparse.ArgumentParser, required: bool = False, help: str | None = None,
              checked: bool = True) -> None:
    """--model: a checkpoint folder (default: the shipped model); `checked`: refused at once unless a folder."""
    kind = folder if checked else str
    if required:
        p.add_argument("--model", required=True, type=kind, help=help or "checkpoint folder (-Paddle or -PT layout)")
    else:
        p.add_argument("--model", default=default_model_dir(), type=kind, help=help or
                       "checkpoint folder (-Paddle or -PT layout); default: the shipped Shakespeare model")


def dtype_arg(p: argparse.ArgumentParser, default: str, help: str | None = None) -> None:
    p.add_argument("--dtype", default=default, choices=DTYPES, help=help)


def strict_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-config", action="store_true",
                   help="treat a missing config field that needs a default as an error")


def allow_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickled .pdparams weights (only files you trust: unpickling can run code)")


def paddle_model_args(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    """How the Paddle model is read: --model, --dtype, --strict-config, --allow-pickle and (one process) --device.
    `distributed` (dist_generate): --model is required and the launcher places the processes, so no --device."""
    model_arg(p, required=distributed)
    dtype_arg(p, "float32", "compute dtype (CPU computes in float32 only)")
    if not distributed:
        p.add_argument("--device", default=None, help="Paddle device, e.g. cpu or gpu:0 (default: Paddle's)")
    strict_config_arg(p)
    allow_pickle_arg(p)


def generate_args(g: argparse.ArgumentParser) -> None:
    """The generate arguments: one contract for ernie-paddle, ernie-onnx and dist_generate."""
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-ids", type=token_ids, help="prompt token ids, e.g. 1,2,3, or @FILE (prints the new ids)")
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer; streams text)")
    src.add_argument("--prompt-file", help="read the prompt text from this UTF-8 file (long contexts)")
    g.add_argument("--chat", action="store_true", help="send --prompt as a user message in the checkpoint's chat "
                   "template (ERNIE-4.5's if it ships none); prints the answer, without the model's reasoning")
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    g.add_argument("--tools", metavar="FILE", type=tool_list,
                   help="with --chat: a JSON file with a list of OpenAI-style tool definitions for the chat template")
    g.add_argument("--show-reasoning", action="store_true", help="with --chat: also print the reasoning (on stderr)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {MAX_NEW_TOKENS_IDS} for --input-ids, {MAX_NEW_TOKENS_TEXT} for --prompt")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    d = GenerationConfig  # the defaults of the flags left as None, named in their help
    g.add_argument("--temperature", type=float, default=None, help=f"with --do-sample (default {d.temperature})")
    g.add_argument("--top-p", type=float, default=None, help=f"with --do-sample (default {d.top_p}: no top-p filter)")
    g.add_argument("--top-k", type=int, default=None, help=f"with --do-sample (default {d.top_k}: no top-k filter)")
    g.add_argument("--seed", type=non_negative_int, default=None, help="with --do-sample (default: a random draw)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"> 1 makes tokens already seen less likely (default {d.repetition_penalty}: no penalty)")
    g.add_argument("--stop-ids", type=token_ids, default=None, help="extra token ids that end generation")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill pass (bounds attention "
                   f"memory at long contexts; default {d.prefill_chunk})")
    g.add_argument("--json", action="store_true", help='print one JSON object; "token_ids" holds the new tokens '
                   '(with --chat also "reasoning", "content" and "tool_calls")')
    json_schema_arg(g)


def prompt_cache_arg(g: argparse.ArgumentParser) -> None:
    """--prompt-cache FILE (generate on one model: ernie-paddle and ernie-onnx, not dist_generate)."""
    g.add_argument("--prompt-cache", metavar="FILE", type=output_file, default=None,
                   help="reuse the KV of the longest prefix this prompt shares with FILE's, then save this prompt's "
                        "KV in FILE (safetensors; created by the first run)")


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

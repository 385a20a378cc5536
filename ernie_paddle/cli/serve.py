"""The `serve` command of `ernie-onnx` and `ernie-paddle`: its arguments and its runner, shared by both.

Each command line passes the function that loads its model (ONNX Runtime or Paddle); nothing here imports
either, nor the server's packages until the command runs, so both command lines work without the `serve` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

from ernie_paddle.cli.args import non_negative_seconds, port, positive_int, size
from ernie_paddle.errors import ErnieError
from ernie_paddle.generation import GenerationConfig

API_KEY_ENV = "ERNIE_API_KEY"
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")  # the `serve` extra of setup.py


def _engine_default(name: str) -> Any:
    from ernie_paddle.serving.engine import Engine

    return inspect.signature(Engine).parameters[name].default


def cache_size(text: str) -> int:
    """A size as `args.size` reads it ("512MiB", "2GB"), or 0 (reuse off)."""
    try:
        if float(text) == 0:
            return 0
    except ValueError:
        pass
    return size(text)


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that gives at least 1: "1 GiB", "512 MiB", "1.5 GiB"."""
    for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.4g} {name}"
    return f"{n} bytes"


def prefix_cache_memory_arg(p: argparse.ArgumentParser, what: str) -> None:
    """`--prefix-cache-memory SIZE`, the server's default; `what` says what the command does with it."""
    default = _engine_default("prefix_cache_memory")
    p.add_argument("--prefix-cache-memory", type=cache_size, default=default, metavar="SIZE",
                   help=f"{what}, e.g. 512MiB or 2GB; 0 turns reuse off (default {size_text(default)})")


def server_args(p: argparse.ArgumentParser) -> None:
    """The server's own arguments (the model's come from each command line)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--max-batch", type=positive_int, default=_engine_default("max_batch"),
                   help="requests decoded together (rows of the KV cache; default %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=_engine_default("max_queue"),
                   help="requests waiting beyond the batch; more are refused with 429 (default %(default)s)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="tokens per request, prompt + generated (default: the model's max_position_embeddings)")
    p.add_argument("--prefill-chunk", type=positive_int, default=GenerationConfig.prefill_chunk,
                   help="prompt tokens per prefill step, between decode steps (default %(default)s)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every route but /health "
                   f"(default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--grace-period", type=non_negative_seconds, default=30.0,
                   help="seconds requests in flight may take to finish after SIGTERM (default %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model name clients give (default: the --model "
                   "folder's name)")
    prefix_cache_memory_arg(p, "host memory kept for the keys and values of prompts already computed, which later "
                               "requests sharing their prefix reuse instead of prefilling again")
    p.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                   help="keep the prefix cache across restarts: read DIR/prefix-cache.safetensors at start (refused "
                        "if another model, export or KV dtype wrote it), write it there when the server stops; DIR "
                        "is made if missing (default: not kept)")


def paddle_server_args(p: argparse.ArgumentParser) -> None:
    """`ernie-paddle serve`: how the Paddle model is read, then the server's arguments."""
    from ernie_paddle.cli.args import paddle_model_args

    paddle_model_args(p)
    server_args(p)


def check_installed() -> None:
    """The server's packages, or one error line naming how to install them."""
    missing = [m for m in SERVE_PACKAGES if _missing(m)]
    if missing:
        raise ErnieError(f"serving needs {', '.join(missing)}: pip install -e \".[serve]\"")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # a module set to None in sys.modules (tests do this)
        return True


def serve(load: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Load the model with `load`, start the engine and answer requests until SIGTERM (status 0)."""
    check_installed()
    from ernie_paddle.serving import server
    from ernie_paddle.serving.app import prefix_cache_file, start_service

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.prefix_cache_dir is not None and args.prefix_cache_memory:
        prefix_cache_file(args.prefix_cache_dir)  # an unusable folder is reported before the model loads
    sock = server.listening_socket(args.host, args.port)
    try:
        service = start_service(load(args), args.model, name=args.served_model_name, api_key=api_key,
                                max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_model_len,
                                prefill_chunk=args.prefill_chunk, prefix_cache_memory=args.prefix_cache_memory,
                                prefix_cache_dir=args.prefix_cache_dir)
        host, bound = sock.getsockname()[:2]
        line = (f"serving {service.model.name} on http://{_url_host(host)}:{bound}/v1 (max batch {args.max_batch}, "
                f"queue {args.max_queue}, context {service.engine.max_len} tokens, {_prefix_cache_text(service)}"
                f"{', API key required' if api_key else ''})")
        try:
            server.run(service, sock, args.grace_period, lambda: print(line, file=sys.stderr, flush=True))
        finally:  # the engine has stopped (Ctrl-C included): the pool is written once, whole
            service.save_prefix_cache()
    finally:
        sock.close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def _prefix_cache_text(service) -> str:
    """The start-up line's account of the prefix cache: its bound, the tokens it holds, what was loaded."""
    from ernie_paddle.memory import prefix_cache_tokens, prefix_itemsize
    from ernie_paddle.serving.prefix_cache import bytes_per_token

    pool, model = service.engine.prefix, service.engine.model
    if not pool.enabled:
        return "prefix cache off"
    per_token = bytes_per_token(model.config, prefix_itemsize(model.identity["kv_dtype"]))
    text = f"prefix cache {size_text(pool.max_bytes)}: {prefix_cache_tokens(pool.max_bytes, per_token)} tokens"
    if service.prefix_cache_file is not None:
        text += f", {pool.tokens()} loaded from {service.prefix_cache_file}"
    return text


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

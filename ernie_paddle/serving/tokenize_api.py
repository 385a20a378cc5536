"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, with vLLM's shapes, on the served tokenizer.

Evaluation harnesses use them to count and split prompts with the model's own tokenizer, without a copy of it on
the client: lm-evaluation-harness's remote tokenizer reads `eos_token` and `bos_token` from /tokenizer_info (and
their ids by tokenizing them), then tokenizes every request's text through /tokenize. /tokenize takes a `prompt`
(text) or chat `messages` (rendered by the chat template); `add_special_tokens` adds the BOS token when the
checkpoint's tokenizer_config.json asks for it (`add_bos_token`), as its Hugging Face tokenizer would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ernie_paddle.errors import ErnieError, InputError
from ernie_paddle.serving.protocol import ApiError, ServedModel, _messages, _show, _tools, read_body
from ernie_paddle.token_ids import check_token_ids

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "tools",
                   "chat_template_kwargs", "return_token_strs"}
DETOKENIZE_FIELDS = {"model", "tokens"}
INFO_FIELDS = ("tokenizer_class", "add_bos_token", "add_eos_token")  # copied from tokenizer_config.json


def add_routes(app: FastAPI, served: ServedModel, dependencies: list) -> None:
    """Register the three routes on `app` (behind `dependencies`: the API key check)."""

    @app.post("/tokenize", dependencies=dependencies)
    async def tokenize(request: Request) -> JSONResponse:
        return JSONResponse(tokenize_body(read_body(await request.body()), served))

    @app.post("/detokenize", dependencies=dependencies)
    async def detokenize(request: Request) -> JSONResponse:
        return JSONResponse(detokenize_body(read_body(await request.body()), served))

    @app.get("/tokenizer_info", dependencies=dependencies)
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(info(served))


def tokenize_body(body: dict, served: ServedModel) -> dict:
    """/tokenize: `{"count", "max_model_len", "tokens", "token_strs"}` of a prompt or of chat messages."""
    _check(body, TOKENIZE_FIELDS, served)
    tok = served.tokenizer
    if body.get("return_token_strs"):
        raise ApiError(400, "return_token_strs is not supported by this server", "return_token_strs")
    special = _flag(body, "add_special_tokens", "messages" not in body)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give either prompt (text) or messages (a chat), not both or neither",
                       "prompt" if "prompt" in body else "messages")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise ApiError(400, f"prompt must be a string, got {_show(body['prompt'])}", "prompt")
        ids = tok.encode(body["prompt"], add_bos=special and bool(tok.config.get("add_bos_token", False)))
    else:
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ApiError(400, f"chat_template_kwargs must be an object, got {_show(kwargs)}", "chat_template_kwargs")
        try:
            ids = tok.apply_chat_template(_messages(body["messages"]), tools=_tools(body.get("tools")),
                                          add_generation_prompt=_flag(body, "add_generation_prompt", True), **kwargs)
        except (ErnieError, TypeError) as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
    return {"count": len(ids), "max_model_len": served.max_len, "tokens": ids, "token_strs": None}


def detokenize_body(body: dict, served: ServedModel) -> dict:
    """/detokenize: `{"prompt": text}` of token ids, special tokens kept."""
    _check(body, DETOKENIZE_FIELDS, served)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ApiError(400, f"tokens must be a list of token ids, got {_show(ids)}", "tokens")
    try:
        check_token_ids(np.asarray(ids, np.int64), min(served.vocab_size, served.tokenizer.vocab_size))
    except InputError as e:
        raise ApiError(400, f"tokens: {e}", "tokens") from None
    return {"prompt": served.tokenizer.decode(ids)}


def info(served: ServedModel) -> dict:
    """/tokenizer_info: the special tokens (bos_token, eos_token ...), the context and the chat template."""
    tok = served.tokenizer
    out: dict[str, Any] = {k: tok.config[k] for k in INFO_FIELDS if k in tok.config}
    out.update(tok.named_tokens)
    out["model_max_length"] = served.max_len
    try:  # the one the server renders chats with (its "default")
        out["chat_template"] = tok.chat_template.select()[1]
    except ErnieError:
        out["chat_template"] = None
    return out


def _check(body: dict, known: set, served: ServedModel) -> None:
    for key in body:
        if key not in known:
            raise ApiError(400, f"unknown field {key!r}: this route takes {', '.join(sorted(known))}", key)
    name = body.get("model")
    if name is not None and name != served.name:
        raise ApiError(400, f"model {_show(name)} is not served here; this server serves {_show(served.name)}",
                       "model", "model_not_found")


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_show(value)}", name)
    return value

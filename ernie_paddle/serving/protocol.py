"""The OpenAI API's requests: a JSON body checked field by field and turned into a `Job` for the engine.

Every refusal is an `ApiError` whose message names the field and the value, and whose `param` is the field's path
(`temperature`, `messages[1].role`), as OpenAI's errors give it. Fields the API has and this server does not
implement are refused unless they hold their default, so a client never gets a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ernie_paddle.text.chat_output import ChatFormat
from ernie_paddle.errors import ErnieError, InputError
from ernie_paddle.generation import GenerationConfig, generation_settings
from ernie_paddle.serving import fields, scoring_api, structured
from ernie_paddle.token_ids import check_token_ids

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions (chat's is the rest of the context)
MAX_LOGPROBS = 20  # the most alternatives per token (as vLLM's default max_logprobs)
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
TEMPLATE_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt", "tokenize")  # not for kwargs
UNSUPPORTED = {  # field: the value it may hold (its default); any other is refused
    "suffix": None, "best_of": 1,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An answer in OpenAI's error format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """What requests are checked against: the name clients use, the tokenizer, the context and the vocabulary."""

    name: str
    tokenizer: Any  # ErnieTokenizer
    max_len: int  # tokens a request may hold (prompt + generated)
    vocab_size: int  # rows of the model's embedding (config.json)
    chat: ChatFormat = field(default_factory=ChatFormat)  # how chat answers split (reasoning, tool calls)
    prefill_chunk: int = GenerationConfig.prefill_chunk  # prompt tokens per prefill slice (`--prefill-chunk`)


@dataclass
class Job:
    """A checked request: the prompt and its generation settings, and how the answer is given."""

    prompt: list[int]
    gen: GenerationConfig
    prompt_param: str  # "prompt" or "messages": what errors about the prompt's length name
    max_tokens_param: str | None  # the field that set max_new_tokens; None when it is the default
    stream: bool = False
    include_usage: bool = False
    stops: list[str] = field(default_factory=list)  # stop strings: the text is cut before the first
    logprobs: int | None = None  # completions: the chosen token's log-probability and the top k
    chat: ChatFormat | None = None  # chat: how the answer splits into reasoning, content and tool calls
    reasoning_open: bool = False  # chat: the prompt ends inside <think>
    echo: bool = False  # completions: the prompt (and its scores) come first in the answer (scoring_api)
    n: int = 1  # choices per prompt
    prompts: list[list[int]] = field(default_factory=list)  # completions: every prompt (`prompt` is the first)
    constraint: Any = None  # grammar.Constraint of response_format or a forced tool_choice (also in gen)


def read_body(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_show(body)}")
    return body


def parse_completion(body: dict, model: ServedModel) -> Job:
    """A /v1/completions body as a Job: `prompt` is text, a list of token ids, or a list holding one of them."""
    fields.check_known(body, chat=False)
    _common_checks(body, model)
    prompts = [_prompt(value, model) for value in scoring_api.prompt_values(body.get("prompt"))]
    prompt = prompts[0]
    logprobs = _optional(body, "logprobs", lambda v, n: _integer(v, n, 0, MAX_LOGPROBS))
    max_tokens = _optional(body, "max_tokens", lambda v, n: _integer(v, n, 0))  # 0: score only (with echo)
    job = _job(body, model, prompt, "prompt", max_tokens or None, "max_tokens", COMPLETION_MAX_TOKENS)
    job.logprobs = logprobs
    structured.attach(job, body, model)
    scoring_api.attach_completion(job, body, prompts, max_tokens, model)
    return job


def parse_chat(body: dict, model: ServedModel) -> Job:
    """A /v1/chat/completions body as a Job: `messages` (and `tools`) rendered by the checkpoint's chat template."""
    fields.check_known(body, chat=True)
    _common_checks(body, model)
    logprobs = fields.chat_logprobs(body)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    forced = structured.tool_constraint(choice, tools, model)
    if choice == "none":
        tools = None
    kwargs = _optional(body, "chat_template_kwargs", _template_kwargs) or {}
    tok = model.tokenizer
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=tools, **kwargs)
    except ErnieError as e:  # the template refused the messages (raise_exception, an unknown role ...)
        raise ApiError(400, f"messages: {e}", "messages") from None
    fmt = model.chat if tools is not None else dataclasses.replace(model.chat, tool_calls=False)
    names = ("max_completion_tokens", "max_tokens")
    given = next((n for n in names if body.get(n) is not None), None)
    max_tokens = _integer(body[given], given, 1) if given else None
    prompt = tok.encode(text)
    job = _job(body, model, prompt, "messages", max_tokens, given, max(1, model.max_len - len(prompt)))
    job.chat, job.reasoning_open = fmt, fmt.opens_reasoning(text)
    structured.attach(job, body, model, forced)
    job.logprobs = logprobs
    scoring_api.attach_n(job, body, model)
    return job


# ---- fields of both endpoints --------------------------------------------------------------------------------------
def _common_checks(body: dict, model: ServedModel) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError(400, f"model {_show(name)} is not served here; this server serves {_show(model.name)}", "model",
                       "model_not_found")
    for key, default in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != default and not (key == "logit_bias" and value == {}):
            raise ApiError(400, f"{key} is not supported by this server (leave it at {_show(default)}), got "
                                f"{_show(value)}", key)


def _job(body: dict, model: ServedModel, prompt: list[int], prompt_param: str, max_tokens: int | None,
         max_tokens_param: str | None, default_max_tokens: int) -> Job:
    """The sampling, stop and streaming fields common to both endpoints."""
    temperature = _optional(body, "temperature", lambda v, n: _number(v, n, 0, 2), 1.0)
    top_p = _optional(body, "top_p", lambda v, n: _number(v, n, 0, 1, low_open=True), 1.0)
    top_k = _optional(body, "top_k", lambda v, n: _integer(v, n, 0), 0)
    repetition_penalty = _optional(body, "repetition_penalty",
                                   lambda v, n: _number(v, n, 0, math.inf, low_open=True), 1.0)
    seed = _optional(body, "seed", lambda v, n: _integer(v, n, 0))
    stream = _optional(body, "stream", _boolean, False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with \"stream\": true", "stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, f"stream_options must be an object, got {_show(options)}", "stream_options")
        include_usage = _optional(options, "include_usage", lambda v, n: _boolean(v, "stream_options." + n), False)
    stops = _stops(body.get("stop"))
    stop_ids = _stop_token_ids(body.get("stop_token_ids"), model.vocab_size)
    gen = generation_settings(model.vocab_size, model.tokenizer, stop_ids,
                              max_new_tokens=max_tokens or default_max_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                              top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                              prefill_chunk=model.prefill_chunk,
                              **fields.logit_rules(body, min(model.vocab_size, model.tokenizer.vocab_size),
                                                   max_tokens or default_max_tokens,
                                                   max_tokens_param if max_tokens else None))
    return Job(prompt, gen, prompt_param, max_tokens_param if max_tokens else None, stream, include_usage, stops)


def _prompt(value: Any, model: ServedModel) -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        raise ApiError(400, f"prompt holds {len(value)} prompts; this server takes one prompt per request", "prompt")
    if isinstance(value, str):
        ids = model.tokenizer.encode(value)
    elif isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        ids = list(value)
    else:
        raise ApiError(400, f"prompt must be a string or a list of token ids, got {_show(value)}", "prompt")
    if not ids:
        raise ApiError(400, "prompt is empty: give at least one token to continue", "prompt")
    try:  # ids the tokenizer cannot decode are refused too: the answer's text is decoded after the prompt's
        check_token_ids(np.asarray(ids, np.int64), min(model.vocab_size, model.tokenizer.vocab_size))
    except InputError as e:
        raise ApiError(400, f"prompt: {e}", "prompt") from None
    return ids


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of strings, got {_show(value)}", "stop")
    if "" in stops:
        raise ApiError(400, "stop strings must not be empty", "stop")
    return stops


def _stop_token_ids(value: Any, vocab_size: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"stop_token_ids must be a list of token ids, got {_show(value)}", "stop_token_ids")
    for i, t in enumerate(value):
        _integer(t, f"stop_token_ids[{i}]", 0, vocab_size - 1)
    return value


def _messages(value: Any) -> list[dict]:
    """Chat messages as the template takes them: a list of text parts becomes one string."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"messages must be a non-empty list of messages, got {_show(value)}", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with a role and content, got {_show(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(_text_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
        elif content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ApiError(400, f"{where}.content is missing", f"{where}.content")
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts, got {_show(content)}",
                           f"{where}.content")
        out.append({**m, "role": "system" if role == "developer" else role, "content": content or ""})
    return out


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ApiError(400, f"{where} must be a text part {{\"type\": \"text\", \"text\": ...}} (this model reads "
                            f"text only), got {_show(part)}", where)
    return part["text"]


def _tools(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, f"tools must be a list of tool definitions, got {_show(value)}", "tools")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}, got "
                                f"{_show(tool)}", where)
        if not isinstance(tool["function"].get("name"), str):
            raise ApiError(400, f"{where}.function.name must be a string, got {_show(tool['function'].get('name'))}",
                           f"{where}.function.name")
    return value


def _template_kwargs(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise ApiError(400, f"{name} must be an object, got {_show(value)}", name)
    reserved = [k for k in value if k in TEMPLATE_ARGUMENTS]
    if reserved:
        raise ApiError(400, f"{name} may not set {reserved[0]} (it comes from the request itself)", name)
    return value


# ---- values --------------------------------------------------------------------------------------------------------
def _optional(body: dict, name: str, check, default: Any = None) -> Any:
    """`check(value, name)` of a field, or `default` when it is absent or null."""
    value = body.get(name)
    return default if value is None else check(value, name)


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        where = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ApiError(400, f"{name} must be {where}, got {_show(value)}", name)
    return value


def _number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low < value if low_open else low <= value) and value <= high
    if not ok:
        where = f"> {low}" if high == math.inf else f"a number in {'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"{name} must be {where}, got {_show(value)}", name)
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_show(value)}", name)
    return value


def _show(value: Any) -> str:
    """A value as the client wrote it (JSON), shortened."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


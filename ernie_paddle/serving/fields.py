"""Which request fields each route knows, and the parsing of the logit-rule and chat-logprobs fields.

A field the server does not know is refused by name (400), never ignored: a client relying on it would otherwise get
a plausible wrong answer. Fields that change nothing about the answer (`user`, `metadata`, ...) are accepted
explicitly. A field named in `NOT_IMPLEMENTED` is refused with its own message. A new field must be added to
`COMMON`, `COMPLETION` or `CHAT` before a request may carry it.
"""

from __future__ import annotations

import json
from typing import Any

from ernie_paddle.logits_processing import BIAS_RANGE, PENALTY_RANGE

MAX_LOGPROBS = 20  # the most alternatives per token (as vLLM's default max_logprobs)
HARMLESS = frozenset({  # accepted and ignored: bookkeeping for the client or OpenAI's platform, not the answer
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
})
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "logprobs",
    "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
    # vLLM's extensions
    "top_k", "repetition_penalty", "stop_token_ids", "min_tokens",
}) | HARMLESS
COMPLETION = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT = COMMON | {"messages", "tools", "tool_choice", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"}
NOT_IMPLEMENTED = {  # OpenAI fields refused by name: field -> the one value that may be given (as if absent)
    "audio": None, "modalities": ["text"], "prediction": None, "reasoning_effort": None, "verbosity": None,
    "web_search_options": None, "functions": None, "function_call": None, "moderation": None,
    "prompt_cache_options": None, "prompt_cache_retention": None,
}


def check_known(body: dict, chat: bool) -> None:
    """Refuse (ApiError 400 naming it) the first field of `body` that the route does not implement."""
    known = CHAT if chat else COMPLETION
    route = "/v1/chat/completions" if chat else "/v1/completions"
    for key, value in body.items():
        if key in NOT_IMPLEMENTED and value not in (None, NOT_IMPLEMENTED[key]):
            raise _refused(f"{key} is not supported by this server, got {_show(value)}", key)
        if key not in known and key not in NOT_IMPLEMENTED:
            raise _refused(f"unknown field {key!r}: {route} does not implement it (the fields it takes are listed "
                             f"in docs/serving.md)", key)


def logit_rules(body: dict, vocab: int, max_new_tokens: int, max_tokens_param: str | None) -> dict:
    """GenerationConfig's presence_penalty, frequency_penalty, logit_bias and min_tokens from `body`, checked:
    `vocab` is the number of token ids that may be chosen; `max_new_tokens` bounds min_tokens."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None:
            out[name] = _number(value, name, PENALTY_RANGE)
    bias = body.get("logit_bias")
    if bias is not None:
        out["logit_bias"] = _logit_bias(bias, vocab)
    low = body.get("min_tokens")
    if low is not None:
        if isinstance(low, bool) or not isinstance(low, int) or low < 0:
            raise _refused(f"min_tokens must be an integer >= 0, got {_show(low)}", "min_tokens")
        if low > max_new_tokens:
            limit = max_tokens_param or "the default max_tokens"
            raise _refused(f"min_tokens {low} exceeds {limit} ({max_new_tokens})", "min_tokens")
        out["min_tokens"] = low
    return out


def chat_logprobs(body: dict) -> int | None:
    """The chat route's `logprobs` (true / false) and `top_logprobs` (0..20, only with logprobs) as the number of
    alternatives per token the engine reports, None when the answer carries no logprobs."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _refused(f"logprobs must be true or false on /v1/chat/completions, got {_show(wanted)}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise _refused(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_show(top)}",
                        "top_logprobs")
        if not wanted:
            raise _refused("top_logprobs needs \"logprobs\": true", "top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(value: Any, vocab: int) -> dict[int, float]:
    if not isinstance(value, dict):
        raise _refused(f"logit_bias must be an object mapping token ids to numbers, got {_show(value)}",
                    "logit_bias")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
        if token is None:
            raise _refused(f"logit_bias keys must be token ids (strings of digits), got {_show(key)}", "logit_bias")
        if token >= vocab:
            raise _refused(f"logit_bias token id {token} is out of range for a vocabulary of {vocab} tokens",
                        "logit_bias")
        out[token] = _number(bias, f"logit_bias[{key}]", BIAS_RANGE, param="logit_bias")
    return out


def _number(value: Any, name: str, bounds: tuple[float, float], param: str | None = None) -> float:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _refused(f"{name} must be a number in [{low:g}, {high:g}], got {_show(value)}", param or name)
    return float(value)


def _refused(message: str, param: str) -> Exception:
    """A 400 naming `param` (imported here: protocol.py imports this module)."""
    from ernie_paddle.serving.protocol import ApiError

    return ApiError(400, message, param)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."

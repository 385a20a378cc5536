"""The OpenAI API's answers: completion and chat completion objects, their streamed chunks, and SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ernie_paddle.serving.text import TokenText

DONE = b"data: [DONE]\n\n"  # the last event of every stream


@dataclass(frozen=True)
class Head:
    """What every object of one answer repeats: its id, object type, creation time and model name."""

    id: str
    object: str  # "text_completion", "chat.completion" or "chat.completion.chunk"
    created: int
    model: str
    include_usage: bool = False  # a stream's chunks carry "usage": null, and a last chunk the usage

    @classmethod
    def new(cls, chat: bool, stream: bool, model: str, include_usage: bool = False) -> Head:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", kind, int(time.time()), model, include_usage)

    def wrap(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or self.include_usage:
            out["usage"] = usage
        return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's `usage`; `cached_tokens`: the prompt tokens taken from the prefix cache instead of computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(tokens: list[TokenText]) -> dict:
    """OpenAI's completions `logprobs`: each token's string, log-probability, top alternatives and text offset."""
    return {"tokens": [t.string for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": [t.offset for t in tokens]}


def chat_message(content: str, reasoning: str | None, calls: list[dict]) -> dict:
    """The assistant's message: content is null when the answer is only tool calls (as OpenAI gives it)."""
    return {"role": "assistant", "content": content if content or not calls else None,
            "reasoning_content": reasoning, "tool_calls": tool_calls(calls)}


def tool_calls(calls: list[dict], first_index: int = 0, indexed: bool = False) -> list[dict]:
    """Parsed calls ({"name", "arguments"}) as OpenAI tool calls, arguments as a JSON string; `indexed` (a stream's
    deltas) numbers them from `first_index`."""
    out = []
    for i, call in enumerate(calls):
        item = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        out.append({"index": first_index + i, **item} if indexed else item)
    return out


def chat_choice(message: dict, finish_reason: str | None, stream: bool = False, logprobs: dict | None = None) -> dict:
    return {"index": 0, "delta" if stream else "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_logprobs(tokens: list[TokenText]) -> dict:
    """OpenAI's chat `logprobs`: per generated token its string, log-probability, UTF-8 bytes and the most likely
    alternatives in the same shape."""
    def entry(string: str, logprob: float) -> dict:
        return {"token": string, "logprob": logprob, "bytes": list(string.encode("utf-8"))}

    return {"content": [{**entry(t.string, t.logprob),
                         "top_logprobs": [entry(s, p) for s, p in t.alternatives or ()]} for t in tokens]}


def sse(obj: dict) -> bytes:
    """One server-sent event holding `obj`."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

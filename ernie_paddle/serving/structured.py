"""Structured output of the OpenAI API: `response_format` and a forced `tool_choice` as a grammar constraint.

`response_format` is {"type": "text"} (no constraint), {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}; `tool_choice` "required" (a call of any given tool) or {"type":
"function", "function": {"name"}} (that tool). A schema that does not compile, or is too large, is a 400 naming the
field it came from.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ernie_paddle import grammar
from ernie_paddle.grammar import Constraint, GrammarError

FORMAT_TYPES = ("text", "json_object", "json_schema")


def _api_error(message: str, param: str):
    from ernie_paddle.serving.protocol import ApiError  # protocol imports this module

    return ApiError(400, message, param)


def _tokenizer(model):
    """llguidance's tokenizer of the served model (`protocol.ServedModel`)."""
    tok = model.tokenizer
    return grammar.grammar_tokenizer(tok.directory, max(model.vocab_size, tok.vocab_size), tok.stop_ids())


def response_constraint(value: Any, model) -> Constraint | None:
    """The constraint of a `response_format` field (None: free text)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in FORMAT_TYPES:
        raise _api_error(f"response_format must be an object whose type is one of {', '.join(FORMAT_TYPES)}, got "
                         f"{_show(value)}", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    tok = _tokenizer(model)
    if kind == "json_object":
        return grammar.json_object(tok, model.vocab_size)
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise _api_error(f"response_format.json_schema must be an object with a \"schema\", got {_show(spec)}",
                         "response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise _api_error(f"response_format.json_schema.name must be a string, got {_show(name)}",
                         "response_format.json_schema.name")
    try:
        return grammar.json_schema(tok, spec["schema"], model.vocab_size, "response_format.json_schema.schema")
    except GrammarError as e:
        raise _api_error(str(e), "response_format") from None


def tool_constraint(choice: Any, tools: list[dict] | None, model) -> Constraint | None:
    """The constraint of a forced `tool_choice` over `tools` (None for "auto", "none" or no choice)."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        chosen = tools
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        chosen = [t for t in tools or () if t["function"]["name"] == name]
        if not chosen:
            names = [t["function"]["name"] for t in tools or ()]
            raise _api_error(f"tool_choice names the function {_show(name)}, which is not among tools ("
                             f"{', '.join(map(_show, names)) or 'none given'})", "tool_choice")
    else:
        raise _api_error(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}, got {_show(choice)}", "tool_choice")
    if not chosen:
        raise _api_error("tool_choice \"required\" needs at least one tool in tools", "tool_choice")
    lt = _tokenizer(model)
    for i, tool in enumerate(tools):  # each schema alone first, so that an error names its tool
        params = tool["function"].get("parameters")
        if params is not None:
            where = f"tools[{i}].function.parameters"
            try:
                grammar.json_schema(lt, params, model.vocab_size, where)
            except GrammarError as e:
                raise _api_error(str(e), where) from None
    tag_ids = tuple(model.tokenizer.token_to_id(t) for t in grammar.TOOL_CALL)
    try:
        return grammar.tool_call(lt, chosen, model.vocab_size, tag_ids)
    except GrammarError as e:
        raise _api_error(f"tools: {e}", "tools") from None


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def attach(job, body: dict, model, forced: Constraint | None = None) -> None:
    """Constrain a checked `protocol.Job` by its request's `response_format`, or by `forced` (the constraint of a
    forced tool_choice, whose answer is then read as a tool call)."""
    fmt = response_constraint(body.get("response_format"), model)
    if forced is not None and fmt is not None:
        raise _api_error("response_format cannot be combined with a forced tool_choice (the answer is the tool "
                         "call)", "response_format")
    constraint = forced or fmt
    if constraint is None:
        return
    job.constraint = constraint
    job.gen = dataclasses.replace(job.gen, constraint=constraint)
    if forced is not None and job.chat is not None:
        job.chat = dataclasses.replace(job.chat, tool_calls=True)

"""Chat templates: the checkpoint's own Jinja template, rendered as transformers' `apply_chat_template` renders it.

Where it is read (transformers' order): `chat_template.jinja`, else tokenizer_config.json's `chat_template` (a string,
or a list of {"name", "template"}: "default", and "tool_use" when tools are given). A checkpoint with neither gets
ERNIE-4.5's template (ERNIE_TEMPLATE), with a warning that says so. The sandbox, filters, globals and variables are
transformers': `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens the tokenizer declares,
and any extra keyword arguments (e.g. `enable_thinking`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

from ernie_paddle import files
from ernie_paddle.errors import ConfigDefaultWarning, InputError, TokenizerError
from ernie_paddle.text.special import SPECIAL

# ERNIE-4.5's chat template (the -PT/-Paddle chat models'): cls, `system\n`, `User: ...\n`, `Assistant: ...` + sep
# per turn, and "Assistant: " to prompt the answer; any other role is an error.
ERNIE_TEMPLATE = (
    "{%- if cls_token is not defined %}{%- set cls_token = \"" + SPECIAL["cls"] + "\" %}{%- endif %}\n"
    "{%- if sep_token is not defined %}{%- set sep_token = \"" + SPECIAL["sep"] + "\" %}{%- endif %}\n"
    "{{- cls_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"system\" %}{{- message.content + \"\\n\" }}\n"
    "    {%- elif message.role == \"user\" %}{{- \"User: \" + message.content + \"\\n\" }}\n"
    "    {%- elif message.role == \"assistant\" %}{{- \"Assistant: \" + message.content + sep_token }}\n"
    "    {%- else %}{{- raise_exception(\"chat message role must be system, user or assistant, got '\" "
    "~ message.role ~ \"'\") }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- \"Assistant: \" }}{%- endif %}\n"
)
BUILT_IN = "the built-in ERNIE-4.5 chat template"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, as transformers aliases it


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template(s) and the special tokens its tokenizer declares (given to the template)."""

    templates: Mapping[str, str]  # name -> Jinja source: "default" unless the checkpoint names several
    origin: str  # the file (and field) it came from, or BUILT_IN: what errors name
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token ...

    @property
    def text(self) -> str:
        """All template sources together: what decides the chat output format (`chat_output.ChatFormat`)."""
        return "\n".join(self.templates.values())

    def select(self, tools: Sequence[dict] | None = None) -> tuple[str, str]:
        """(where, source) of the template to use, chosen as transformers chooses: "tool_use" when tools are given
        and it exists, else "default"."""
        name = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        if name not in self.templates:
            raise TokenizerError(f"{self.origin}: no \"default\" chat template among {sorted(self.templates)}")
        where = self.origin if list(self.templates) == ["default"] else f"{self.origin} {name!r}"
        return where, self.templates[name]

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None, **kwargs) -> str:
        """The prompt text of `messages` (with `tools` and `documents`, if any); extra keyword arguments reach the
        template and override the special tokens. A template that fails is a TokenizerError naming it."""
        where, source = self.select(tools)
        variables = {**self.special_tokens, **kwargs}
        try:
            template = _compile(source)
        except _jinja().TemplateSyntaxError as e:
            raise TokenizerError(f"{where}: chat template syntax error at line {e.lineno}: {e.message}") from None
        try:
            return template.render(messages=_as_transformers_passes(messages), tools=_plain(tools, "tools"),
                                   documents=_plain(documents, "documents"),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except _jinja().TemplateError as e:  # raise_exception(...), undefined names, sandbox refusals
            raise TokenizerError(f"{where}: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            raise TokenizerError(f"{where}: the chat template failed on these messages ({type(e).__name__}: {e})") \
                from None


def read_chat_template(directory: str, tokenizer_config: dict, special_tokens: Mapping[str, str]) -> ChatTemplate:
    """The chat template of a checkpoint folder: chat_template.jinja, else tokenizer_config.json's `chat_template`,
    else ERNIE_TEMPLATE with a ConfigDefaultWarning."""
    path = os.path.join(directory, files.CHAT_TEMPLATE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return ChatTemplate({"default": f.read()}, path, dict(special_tokens))
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    value = tokenizer_config.get("chat_template")
    where = f"{os.path.join(directory, files.TOKENIZER_CONFIG)} (chat_template)"
    if value is None:
        warnings.warn(f"{directory}: no chat template in {files.TOKENIZER_CONFIG} or {files.CHAT_TEMPLATE}; using "
                      f"{BUILT_IN}", ConfigDefaultWarning, stacklevel=3)
        return ChatTemplate({"default": ERNIE_TEMPLATE}, BUILT_IN, dict(special_tokens))
    if isinstance(value, str):
        return ChatTemplate({"default": value}, where, dict(special_tokens))
    if isinstance(value, list) and value and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in value):
        return ChatTemplate({t["name"]: t["template"] for t in value}, where, dict(special_tokens))
    raise TokenizerError(f"{where}: expected a template string or a list of {{\"name\", \"template\"}} objects, got "
                         f"{json.dumps(value)[:80]}")


# ---- rendering as transformers renders ---------------------------------------------------------------------------
def _jinja():
    import jinja2

    return jinja2


@lru_cache(maxsize=None)
def _environment():
    """transformers' sandbox: trim_blocks, lstrip_blocks, loop controls, `{% generation %}` blocks, a `tojson`
    that keeps non-ASCII text, `raise_exception` and `strftime_now`."""
    jinja2 = _jinja()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendered as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    return _environment().from_string(source)


def _as_transformers_passes(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as transformers gives them to a template: keys whose value is None dropped, and a message's reasoning
    under every name templates read it by (`reasoning_content`, `thinking`)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat message {i + 1}: expected an object with a role and content, got {message!r}")
        m = {k: _plain(v, f"chat message {i + 1}") for k, v in message.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value: Any, what: str) -> Any:
    """JSON data (what a template may see); anything else is an InputError naming `what`."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    raise InputError(f"{what}: only JSON data can go to a chat template, got a {type(value).__name__}")

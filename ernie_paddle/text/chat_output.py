"""A chat answer split into reasoning, content and tool calls, whole or as it streams.

ERNIE-4.5 -Thinking checkpoints answer `reasoning</think>\\n\\n<response>\\nanswer\\n</response>` (their template
opens `<think>\\n` in the generation prompt), or `reasoning</think>` then `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` blocks. As vLLM's ernie45 and FastDeploy's ernie-x1 parsers do: text up to `</think>` is the
reasoning (a leading `<think>` is dropped), `<response>` tags are removed from the content, and each tool-call block
becomes {"name", "arguments"}. Unlike them, one state machine serves the whole text and the stream, so both give the
same split; whitespace next to a tag, at the start and at the end is trimmed (the template adds it, not the model).
A tool call that is not valid JSON stays in the content as text, with a ModelOutputWarning. A model whose template
and vocabulary have none of these tags (`ChatFormat()`) gets its text as content, untouched.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable

THINK = ("<think>", "</think>")
RESPONSE = ("<response>", "</response>")
TOOL_CALL = ("<tool_call>", "</tool_call>")


class ModelOutputWarning(UserWarning):
    """The model's output broke its chat format (e.g. a tool call that is not JSON); it is kept as text."""


@dataclass(frozen=True)
class ChatFormat:
    """The tags a checkpoint's chat answers use; decided by `detect` alone."""

    reasoning: bool = False  # <think> ... </think>
    response: bool = False  # <response> ... </response> around the answer
    tool_calls: bool = False  # <tool_call> {json} </tool_call>

    @classmethod
    def detect(cls, template: str, has_token: Callable[[str], bool]) -> ChatFormat:
        """Each kind of tag is used when its closing tag is in the chat template text or in the vocabulary."""
        uses = lambda tags: tags[1] in template or has_token(tags[1])  # noqa: E731
        return cls(uses(THINK), uses(RESPONSE), uses(TOOL_CALL))

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The format of an `ErnieTokenizer`'s checkpoint (its chat template and vocabulary)."""
        return cls.detect(tokenizer.chat_template.text, lambda t: tokenizer.token_to_id(t) is not None)

    @property
    def tags(self) -> tuple[str, ...]:
        """The tag strings in use: decode generated ids keeping these even when they are special tokens."""
        return sum((tags for used, tags in ((self.reasoning, THINK), (self.response, RESPONSE),
                                            (self.tool_calls, TOOL_CALL)) if used), ())

    def opens_reasoning(self, prompt: str) -> bool:
        """Whether a rendered prompt ends inside `<think>`, so the answer starts with reasoning."""
        return self.reasoning and prompt.rstrip().endswith(THINK[0])


@dataclass
class ChatDelta:
    """What one piece of streamed text added: reasoning and content text, and tool calls completed by it."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class ChatOutput:
    """A whole answer: `reasoning` is None when the answer had no reasoning part."""

    reasoning: str | None
    content: str
    tool_calls: list[dict]


class ChatOutputParser:
    """Splits text as it streams: `push(text)` returns its ChatDelta, `finish()` the rest; `result` is the whole.

    Text that may be the start of a tag (`</thi`) or whitespace that may end a part is held back until the next push
    tells; a tool call is given once its `</tool_call>` arrives.
    """

    def __init__(self, fmt: ChatFormat, reasoning_open: bool = False):
        self.fmt, self.reasoning_open = fmt, reasoning_open
        self.result = ChatOutput(None, "", [])
        self._buf = ""
        self._state = "start" if fmt.reasoning else "content"  # start, reasoning, content, tool
        self._trim = bool(fmt.tags)
        self._started, self._ws = False, ""  # the current part: non-space text seen, trailing whitespace held
        self._finished = False

    def push(self, text: str) -> ChatDelta:
        """Take the next piece of decoded text; return what it completes."""
        if self._finished:
            raise RuntimeError("ChatOutputParser.push after finish()")
        self._buf += text
        delta = ChatDelta()
        while self._step(delta, final=False):
            pass
        return self._record(delta)

    def finish(self) -> ChatDelta:
        """End of the answer: give what was held back (an unclosed tool call becomes text, with a warning)."""
        delta = ChatDelta()
        if not self._finished:
            self._finished = True
            while self._step(delta, final=True):
                pass
        return self._record(delta)

    # ---- the state machine -----------------------------------------------------------------------------------------
    def _step(self, delta: ChatDelta, final: bool) -> bool:
        """Consume what the buffer allows; True when the state changed (so another step may consume more)."""
        if self._state == "start":  # before any text: an explicit <think>, or the prompt's choice
            head = self._buf.lstrip()
            if head.startswith(THINK[0]):
                self._buf = head[len(THINK[0]):]
            elif THINK[0].startswith(head) and not final:
                return False
            self._state = "reasoning" if self.reasoning_open or head.startswith(THINK[0]) else "content"
            if self._state == "reasoning":
                self.result.reasoning = ""
            return True
        if self._state == "reasoning":
            return self._until((THINK[1],), final, lambda text: _add(delta, "reasoning", self._part(text)),
                               lambda tag: self._enter("content"))
        if self._state == "content":
            tags = (RESPONSE if self.fmt.response else ()) + (TOOL_CALL[:1] if self.fmt.tool_calls else ())
            return self._until(tags, final, lambda text: _add(delta, "content", self._part(text)),
                               lambda tag: self._enter("tool" if tag == TOOL_CALL[0] else "content"))
        # "tool": the JSON waits whole for its closing tag
        end = self._buf.find(TOOL_CALL[1])
        if end < 0 and not final:
            return False
        body, self._buf = (self._buf[:end], self._buf[end + len(TOOL_CALL[1]):]) if end >= 0 else (self._buf, "")
        call = _tool_call(body) if end >= 0 else _malformed(body, "not closed by </tool_call>")
        if call is not None:
            delta.tool_calls.append(call)
        else:
            _add(delta, "content", self._part(TOOL_CALL[0] + body + (TOOL_CALL[1] if end >= 0 else "")))
        self._state = "content"
        return end >= 0

    def _until(self, tags: tuple[str, ...], final: bool, text: Callable[[str], None],
               tag_found: Callable[[str], None]) -> bool:
        """Give the buffer's text up to the first of `tags` (holding back a possible tag start), then the tag."""
        hits = [(i, t) for t in tags if (i := self._buf.find(t)) >= 0]
        if hits:
            i, tag = min(hits)
            text(self._buf[:i])
            self._buf = self._buf[i + len(tag):]
            tag_found(tag)
            return True
        keep = 0 if final else partial_tag_length(self._buf, tags)
        text(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _enter(self, state: str) -> None:
        """A tag ends the current part: its trailing whitespace is dropped."""
        self._state, self._started, self._ws = state, False, ""

    def _part(self, text: str) -> str:
        """The text to give of the current part, trimmed at both ends when the format has tags."""
        if not self._trim:
            return text
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        return body

    def _record(self, delta: ChatDelta) -> ChatDelta:
        r = self.result
        if delta.reasoning:
            r.reasoning = (r.reasoning or "") + delta.reasoning
        r.content += delta.content
        r.tool_calls += delta.tool_calls
        return delta


def parse_chat_output(text: str, fmt: ChatFormat, reasoning_open: bool = False) -> ChatOutput:
    """The whole answer `text` (decoded keeping `fmt.tags`) split into reasoning, content and tool calls."""
    parser = ChatOutputParser(fmt, reasoning_open)
    parser.push(text)
    parser.finish()
    return parser.result


def _add(delta: ChatDelta, part: str, text: str) -> None:
    setattr(delta, part, getattr(delta, part) + text)


def partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that some tag starts with (it may complete in the next piece)."""
    for n in range(min(len(text), max(map(len, tags), default=1) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _tool_call(body: str) -> dict | None:
    """{"name": str, "arguments": object} from a tool-call block's JSON; None (and a warning) when malformed."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return _malformed(body, f"not JSON ({e})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return _malformed(body, 'not {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return _malformed(body, "its arguments are not a JSON object")
    return {"name": call["name"], "arguments": arguments}


def _malformed(body: str, why: str) -> None:
    warnings.warn(f"the model's tool call is {why}; it is kept as text: {body.strip()[:80]!r}", ModelOutputWarning,
                  stacklevel=2)
    return None

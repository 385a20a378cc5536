"""Chat answers split into reasoning, content and tool calls: whole, and streamed one token (or one character) at a
time through the tokenizer's incremental decoder, which must give the same split as the whole text."""

from __future__ import annotations

import json

import pytest

from ernie_paddle.text.chat_output import ChatFormat, ChatOutput, ChatOutputParser, ModelOutputWarning, parse_chat_output
from ernie_paddle.text.tokenizer import ErnieTokenizer, IncrementalDecoder
from ernie_paddle.paddle.training import train_tokenizer

from test_chat_template import CORPUS, make_thinking_checkpoint

THINKING = ChatFormat(reasoning=True, response=True, tool_calls=True)
WEATHER = {"name": "get_weather", "arguments": {"city": "Rome", "unit": "°C"}}
TIME = {"name": "get_time", "arguments": {}}

# (answer text after a prompt that opens <think>, expected split)
ANSWERS = {
    "response": ("Rome is far.\nAsk the tool?\n</think>\n\n<response>\nAll: speak, speak.\n</response>\n",
                 ChatOutput("Rome is far.\nAsk the tool?", "All: speak, speak.", [])),
    "two tool calls": ("Two tools.\n</think>\n\n<tool_call>\n" + json.dumps(WEATHER, ensure_ascii=False)
                       + "\n</tool_call>\n<tool_call>\n" + json.dumps(TIME) + "\n</tool_call>\n",
                       ChatOutput("Two tools.", "", [WEATHER, TIME])),
    "text then a tool call": ('Hm.</think>Let me look.\n<tool_call>{"name": "get_time", "arguments": "{}"}'
                              '</tool_call>', ChatOutput("Hm.", "Let me look.", [TIME])),
    "no response tags": ("<think>\nshort\n</think>\nAll: speak.", ChatOutput("short", "All: speak.", [])),
    "reasoning cut off": ("Still thinking about Rome", ChatOutput("Still thinking about Rome", "", [])),
}
MALFORMED = ('Oops.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>\n'
             '<tool_call>\n' + json.dumps(TIME) + '\n</tool_call>')


@pytest.fixture(scope="module")
def thinking(tmp_path_factory) -> ErnieTokenizer:
    d = str(tmp_path_factory.mktemp("thinking"))
    make_thinking_checkpoint(d)
    return ErnieTokenizer(d)


def stream(tok: ErnieTokenizer, prompt: str, answer: str) -> tuple[list, ChatOutput]:
    """Feed the answer's ids one at a time, as generation does: decoded keeping the format's tags, then parsed."""
    prompt_ids = tok.encode(prompt)
    decoder = IncrementalDecoder(tok, prompt_ids, keep=THINKING.tags)
    parser = ChatOutputParser(THINKING, THINKING.opens_reasoning(prompt))
    deltas = [parser.push(decoder.push(i)) for i in tok.encode(answer)] + [parser.finish()]
    return deltas, parser.result


@pytest.mark.parametrize("case", list(ANSWERS))
def test_whole_and_streamed_splits_agree(thinking, case):
    text, expected = ANSWERS[case]
    assert parse_chat_output(text, THINKING, reasoning_open=True) == expected
    prompt = thinking.apply_chat_template([{"role": "user", "content": "Weather in Rome?"}], tokenize=False)
    deltas, result = stream(thinking, prompt, text)
    assert result == expected
    assert "".join(d.reasoning for d in deltas) == expected.reasoning
    assert "".join(d.content for d in deltas) == expected.content
    assert [c for d in deltas for c in d.tool_calls] == expected.tool_calls
    parser = ChatOutputParser(THINKING, reasoning_open=True)  # the hardest chunking: one character at a time
    for ch in text:
        parser.push(ch)
    parser.finish()
    assert parser.result == expected


def test_reasoning_streams_before_the_answer_and_tool_calls_come_whole(thinking):
    prompt = thinking.apply_chat_template([{"role": "user", "content": "Weather?"}], tokenize=False)
    text = ANSWERS["two tool calls"][0]
    deltas, _ = stream(thinking, prompt, text)
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert deltas[first_call].tool_calls == [WEATHER]  # given at the token that closes its block
    assert thinking.encode(text)[first_call] == thinking.token_to_id("</tool_call>")
    assert "".join(d.reasoning for d in deltas[:3]) == "Two"  # reasoning is not held back to the end


def test_malformed_tool_call_is_kept_as_text_with_a_warning():
    with pytest.warns(ModelOutputWarning, match=r"^the model's tool call is not JSON \(Expecting value: line 2 "
                                                r"column 47 \(char 47\)\); it is kept as text: '\{\"name\": "
                                                r"\"get_weather\", \"arguments\": \{\"city\": \}'$"):
        out = parse_chat_output(MALFORMED, THINKING, reasoning_open=True)
    assert out == ChatOutput("Oops.", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
                             [TIME])
    with pytest.warns(ModelOutputWarning, match=r"tool call is not closed by </tool_call>; it is kept as text"):
        out = parse_chat_output('x</think><tool_call>{"name": "get_ti', THINKING, reasoning_open=True)
    assert out == ChatOutput("x", '<tool_call>{"name": "get_ti', [])
    with pytest.warns(ModelOutputWarning, match=r'tool call is not \{"name": ..., "arguments": \{...\}\}'):
        assert parse_chat_output('<tool_call>[1, 2]</tool_call>', THINKING).tool_calls == []


def test_no_reasoning_when_the_prompt_does_not_open_it():
    assert parse_chat_output("<response>\nHi.\n</response>", THINKING) == ChatOutput(None, "Hi.", [])
    assert parse_chat_output("  <think>why\n</think>\n\nHi.", THINKING) == ChatOutput("why", "Hi.", [])
    assert parse_chat_output("", THINKING, reasoning_open=True) == ChatOutput("", "", [])
    plain = ChatFormat()  # a plain model's answer is its text, untouched
    assert parse_chat_output("  ROMEO:\n</think> <tool_call>{}", plain) == ChatOutput(
        None, "  ROMEO:\n</think> <tool_call>{}", [])


def test_the_format_is_decided_by_the_template_and_vocabulary(thinking, tmp_path):
    assert ChatFormat.of(thinking) == THINKING and THINKING.tags == (
        "<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>")
    train_tokenizer(CORPUS, str(tmp_path), vocab_size=400)
    with pytest.warns(UserWarning, match="using the built-in ERNIE-4.5 chat template"):
        assert ChatFormat.of(ErnieTokenizer(str(tmp_path))) == ChatFormat()
    assert ChatFormat.detect("{{ '<think>\\n' }}...</think>", lambda t: False) == ChatFormat(reasoning=True)
    assert ChatFormat.detect("", lambda t: t == "</tool_call>") == ChatFormat(tool_calls=True)
    assert THINKING.opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not THINKING.opens_reasoning("Assistant: ") and not ChatFormat().opens_reasoning("<think>\n")

"""Chat templates: the checkpoint's own, found where transformers finds it and rendered exactly as transformers'
`apply_chat_template` renders it (transformers is the oracle here, never a runtime import), ERNIE-4.5's when the
checkpoint has none; template errors name the template."""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from ernie_paddle.text.chat_template import BUILT_IN, ERNIE_TEMPLATE, ChatTemplate, read_chat_template
from ernie_paddle.errors import TokenizerError
from ernie_paddle.text.tokenizer import ErnieTokenizer
from ernie_paddle.paddle.training import train_tokenizer

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          "What is the weather in Rome? Sunny, 24 degrees.\n") * 200

# A -Thinking-style template, modelled on the shape of baidu/ERNIE-4.5-21B-A3B-Thinking's (a system block with
# think_mode and the tool list, <response> around answers, <tool_call> JSON blocks, and a generation prompt that
# opens <think>); written for these tests, not copied.
THINKING_TEMPLATE = r"""
{%- if messages and messages[0].role == "system" %}{%- set system = messages[0].content %}
{%- else %}{%- set system = "<global_setting>\nthink_mode=True\n</global_setting>" %}{%- endif %}
{{- "<|im_start|>system\n" + system }}
{%- if tools %}
    {{- "\n\n<tool_list>" }}
    {%- for tool in tools %}
        {{- "\n" + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tool_list>\nTo call tools, answer <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>." }}
{%- endif %}
{{- "<|im_end|>\n\n" }}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- "<|im_start|>user\n" + message.content + "<|im_end|>\n\n" }}
    {%- elif message.role == "assistant" %}
        {{- "<|im_start|>assistant\n" }}
        {%- if message.reasoning_content %}{{- "<think>\n" + message.reasoning_content + "\n</think>\n\n" }}{%- endif %}
        {%- for call in message.tool_calls or [] %}
            {{- "<tool_call>\n" + ({"name": call.function.name, "arguments": call.function.arguments} | tojson)
                + "\n</tool_call>\n" }}
        {%- endfor %}
        {%- if message.content %}{{- "<response>\n" + message.content + "\n</response>\n" }}{%- endif %}
        {{- "<|im_end|>\n\n" }}
    {%- elif message.role == "tool" %}
        {{- "<|im_start|>tool\n<tool_response>\n" + message.content + "\n</tool_response><|im_end|>\n\n" }}
    {%- elif message.role != "system" %}
        {{- raise_exception("unknown role: " + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- "<|im_start|>assistant\n<think>\n\n</think>\n\n" }}
    {%- else %}
        {{- "<|im_start|>assistant\n<think>\n" }}
    {%- endif %}
{%- endif %}
"""
THINKING_TOKENS = ["<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>", "<|im_start|>",
                   "<|im_end|>"]
VOCAB = 400  # pieces in tokenizer.model; the tokens above follow (ids 400..407), inside the tiny model's 512

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city (°C)",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "reasoning": "I should ask the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "Sunny, 24 degrees."},
    {"role": "assistant", "content": "Sunny, 24 degrees.", "reasoning_content": "The tool answered."},
    {"role": "user", "content": "Speak, speak. Naïve façade, 東京?"},
]


def make_thinking_checkpoint(d: str, template: str = THINKING_TEMPLATE) -> None:
    """A tokenizer folder like a -Thinking checkpoint's: a trained tokenizer.model, the tags as added tokens in
    tokenizer_config.json (<|im_end|> ends a turn, as generation_config.json says) and `template` as its template."""
    train_tokenizer(CORPUS, d, vocab_size=VOCAB)
    path = os.path.join(d, "tokenizer_config.json")
    config = json.load(open(path))
    config["added_tokens_decoder"] = {str(VOCAB + i): {"content": t, "special": t.startswith("<|")}
                                      for i, t in enumerate(THINKING_TOKENS)}
    config["chat_template"] = template
    json.dump(config, open(path, "w"), indent=2)
    json.dump({"eos_token_id": [2, VOCAB + THINKING_TOKENS.index("<|im_end|>")]},
              open(os.path.join(d, "generation_config.json"), "w"))


@pytest.fixture(scope="module")
def thinking(tmp_path_factory) -> ErnieTokenizer:
    d = str(tmp_path_factory.mktemp("thinking"))
    make_thinking_checkpoint(d)
    return ErnieTokenizer(d)


def oracle(template: str, special_tokens: dict, messages: list[dict], **kwargs) -> str:
    """What transformers' apply_chat_template renders (the test extra; the test is skipped without it)."""
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                 chat_template=template, **special_tokens)
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("special", ["declared", "none"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_ernie_template_renders_as_transformers_does(special, generation_prompt):
    tokens = {"cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "bos_token": "<s>"} \
        if special == "declared" else {}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Speak, 東京."}]
    ours = ChatTemplate({"default": ERNIE_TEMPLATE}, BUILT_IN, tokens).render(
        messages, add_generation_prompt=generation_prompt)
    assert ours == oracle(ERNIE_TEMPLATE, tokens, messages, add_generation_prompt=generation_prompt)
    assert ours.startswith("<|begin_of_sentence|>Be brief.\nUser: Who art thou?\nAssistant: A player."
                           "<|end_of_sentence|>User: Speak, 東京.\n")


@pytest.mark.parametrize("kwargs", [{}, {"tools": TOOLS}, {"tools": TOOLS, "enable_thinking": False}])
def test_thinking_template_with_tools_renders_as_transformers_does(thinking, kwargs):
    ours = thinking.apply_chat_template(CONVERSATION, tokenize=False, **kwargs)
    assert ours == oracle(THINKING_TEMPLATE, thinking.named_tokens, CONVERSATION, add_generation_prompt=True,
                          **kwargs)
    assert ours.endswith("<|im_start|>assistant\n<think>\n" + ("\n</think>\n\n" if kwargs.get("enable_thinking") is
                                                                False else ""))
    assert '"description": "Weather in a city (°C)"' in ours if kwargs else "<tool_list>" not in ours
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in ours
    assert "<think>\nI should ask the tool.\n</think>" in ours  # "reasoning" is read as reasoning_content
    ids = thinking.encode(ours)
    assert thinking.token_to_id("<|im_start|>") in ids and thinking.decode(ids) == ours


def test_generation_blocks_strftime_now_and_template_errors(thinking, tmp_path):
    template = ("{% for m in messages %}{% generation %}{{ m.content | upper }}{% endgeneration %}{% endfor %}"
                "{{ strftime_now('%Y') }}")
    messages = [{"role": "user", "content": "hé"}]
    year = datetime.now().strftime("%Y")
    ours = ChatTemplate({"default": template}, "t").render(messages)
    theirs = oracle(template, {}, messages, add_generation_prompt=True)
    # the clock is read around the two renders: they may differ only if a new year began in between
    assert ours == theirs == "HÉ" + year or datetime.now().strftime("%Y") != year
    with pytest.raises(TokenizerError) as e:
        thinking.apply_chat_template([{"role": "robot", "content": "x"}])
    assert str(e.value) == f"{thinking.directory}/tokenizer_config.json (chat_template): unknown role: robot"
    with pytest.raises(TokenizerError) as e:
        ChatTemplate({"default": "{% for m in messages %}{{ m.content }"}, "my.jinja").render(messages)
    assert str(e.value) == "my.jinja: chat template syntax error at line 1: unexpected '}'"
    with pytest.raises(TokenizerError) as e:
        ChatTemplate({"default": "{{ messages[0].content + 1 }}"}, "my.jinja").render(messages)
    assert str(e.value) == ('my.jinja: the chat template failed on these messages (TypeError: can only concatenate '
                            'str (not "int") to str)')


def test_where_the_template_is_read_from(tmp_path):
    config = {"chat_template": "config {{ messages[0].content }}"}
    assert read_chat_template(str(tmp_path), config, {}).render([{"role": "user", "content": "x"}]) == "config x"
    (tmp_path / "chat_template.jinja").write_text("file {{ messages[0].content }}")
    template = read_chat_template(str(tmp_path), config, {})  # the .jinja file wins, as in transformers
    assert template.render([{"role": "user", "content": "x"}]) == "file x"
    assert template.origin == str(tmp_path / "chat_template.jinja")
    os.remove(tmp_path / "chat_template.jinja")
    named = {"chat_template": [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]}
    template = read_chat_template(str(tmp_path), named, {})
    assert template.render([], tools=[]) == "tools" and template.render([]) == "plain"
    path = tmp_path / "tokenizer_config.json"
    with pytest.raises(TokenizerError) as e:
        read_chat_template(str(tmp_path), {"chat_template": [{"name": "tool_use", "template": "t"}]}, {}).render([])
    assert str(e.value) == f"{path} (chat_template): no \"default\" chat template among ['tool_use']"
    with pytest.raises(TokenizerError) as e:
        read_chat_template(str(tmp_path), {"chat_template": 7}, {})
    assert str(e.value) == (f"{path} (chat_template): expected a template string or a list of {{\"name\", "
                            f"\"template\"}} objects, got 7")
    with pytest.warns(UserWarning, match=f"^{tmp_path}: no chat template in tokenizer_config.json or "
                                         f"chat_template.jinja; using the built-in ERNIE-4.5 chat template$"):
        assert read_chat_template(str(tmp_path), {}, {}).templates == {"default": ERNIE_TEMPLATE}

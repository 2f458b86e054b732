"""Tool calls' engine side (`bulk.engine.tools`, `bulk.engine.chat`) and the chat route's stream
shaping (`bulk.server.openai_tools.ToolStream`), without a server: calls read back from the formats
models write (Hermes blocks, Mistral's list, Llama's bare JSON), only for offered tools; text that
may still be a call held back and then streamed; tools given to a chat template that knows them as
`tools=`, and to any other model in a system turn; the forced-call schema."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from bulk.config import KVCacheConfig
from bulk.engine.request import parse_request
from bulk.engine.tools import forced_call_schema, may_be_a_call, parse_tool_calls
from bulk.errors import InvalidRequestError
from bulk.models.tokenizer import HFTokenizer
from bulk.server.openai_tools import ToolStream, tool_plan

NAMES = ["get_weather", "get_time"]
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
    for n in NAMES
]
CONFIG = KVCacheConfig(model="demo")


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", 1),
        (
            'Let me check.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
            "Let me check.",
            2,
        ),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', "", 1),
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', "", 1),
        ('{"name": "delete_everything", "arguments": {}}', None, 0),  # not an offered tool
        ('<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>', None, 0),  # not an object
        ("<tool_call>{broken", None, 0),
        ("It is sunny.", None, 0),
    ],
)
def test_calls_read_back_from_each_format(text, content, calls):
    found_content, found = parse_tool_calls(text, NAMES)
    assert len(found) == calls
    assert found_content == (text if content is None else content)
    for call in found:
        assert call.name in NAMES and isinstance(json.loads(call.arguments), dict)
        assert call.id.startswith("call_")
    if calls > 1:
        assert len(parse_tool_calls(text, NAMES, parallel=False)[1]) == 1


def test_text_that_may_be_a_call_is_held():
    assert may_be_a_call("") and may_be_a_call("  <tool") and may_be_a_call("{") and may_be_a_call("[TOOL")
    assert not may_be_a_call("Hello") and not may_be_a_call("<b>")


def test_auto_stream_holds_a_call_and_streams_text():
    plan = tool_plan(TOOLS, "auto", None)
    stream = ToolStream(plan)
    pieces = ["<tool", "_call>", '{"name": "get_time", ', '"arguments": {}}', "</tool_call>"]
    assert [d for p in pieces for d in stream.feed(p)] == []
    deltas, reason = stream.finish("".join(pieces), "stop")
    assert reason == "tool_calls"
    (delta,) = deltas
    call = delta["tool_calls"][0]
    assert call["index"] == 0 and call["function"] == {"name": "get_time", "arguments": "{}"}

    text = ToolStream(plan)
    assert text.feed("Hi") == [{"content": "Hi"}]
    assert text.feed(" there") == [{"content": " there"}]
    assert text.finish("Hi there", "length") == ([], "length")


def test_named_stream_sends_the_header_then_arguments():
    stream = ToolStream(tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None))
    (start,) = stream.start()
    header = start["tool_calls"][0]
    assert header["function"] == {"name": "get_weather", "arguments": ""} and header["id"].startswith("call_")
    assert stream.feed('{"a"') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}]
    assert stream.finish('{"a": 1}', "stop") == ([], "tool_calls")


def test_forced_call_schema():
    schema = forced_call_schema(TOOLS, None, parallel=False)
    jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "other", "arguments": {}}], schema)
    assert forced_call_schema(TOOLS, "get_time", True) == TOOLS[1]["function"]["parameters"]


TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}"
    "[call {{ c.function.name }} {{ c.function.arguments.city }}]"
    "{% endfor %}"
    "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
]


def test_a_template_that_knows_tools_gets_them(chat_model):
    hf = copy.deepcopy(chat_model.tokenizer._tokenizer)
    hf.chat_template = TOOLS_TEMPLATE
    tokenizer = HFTokenizer(hf)
    request = parse_request({"messages": CONVERSATION, "tools": TOOLS}, CONFIG)
    text = request.prompt_text(tokenizer)
    # The tools and the call (its arguments as an object) in the template's own format.
    assert text.startswith("<|tools|>get_weather;get_time;<|user|>Weather?")
    assert "[call get_weather Oslo]" in text and "[for call_1]" in text and text.endswith("<|assistant|>")


def test_a_model_without_tool_support_is_told_in_a_system_turn(chat_model):
    request = parse_request({"messages": CONVERSATION, "tools": TOOLS}, CONFIG)
    text = request.prompt_text(chat_model.tokenizer)  # CHAT_TEMPLATE: no tools
    assert text.startswith("<|system|>You can call functions")
    assert '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    # The tools are part of the request's identity (the response cache's key).
    assert request.prompt != parse_request({"messages": CONVERSATION}, CONFIG).prompt


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": "q", "tools": TOOLS}, "tools"),
        ({"messages": CONVERSATION[:1], "tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"messages": CONVERSATION[:1], "tools": TOOLS + TOOLS[:1]}, "tools.2.function.name"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {}}]}]},
            "messages.0.tool_calls",
        ),
    ],
)
def test_bad_tools_name_the_field(body, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(body, CONFIG)
    assert info.value.field == field

"""Tool calls on `/v1/chat/completions` over a real uvicorn socket, with the official `openai`
package: a named function and `required` force calls whose arguments parse and validate against the
tool's schema (`jsonschema`), streamed as `delta.tool_calls` that the SDK's own stream helper
assembles; `parallel_tool_calls: false` gives one call; a tool's result sent back as a `tool`
message continues the conversation, its earlier prompt reused from the cache; bad tool fields are a
422 naming the field. The demo model's text is random: only the constraint makes the calls valid."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(roomy_server):
    return roomy_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_is_called_with_valid_arguments(client, temperature):
    answer = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=temperature,
        seed=3,
        max_tokens=120,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _valid(call)


def test_required_calls_any_tool_and_parallel_false_gives_one(client):
    for parallel in (True, False):
        answer = client.chat.completions.create(
            model="demo",
            messages=CHAT,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=0.8,
            seed=5,
            max_tokens=600,  # random weights: a string may be written in many-byte characters
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        for call in calls:
            _valid(call)
        assert len({call.id for call in calls}) == len(calls)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_streamed_tool_calls_assembled_by_the_sdk(client, tool_choice):
    # One call (greedy random text may otherwise add calls until max_tokens).
    with client.chat.completions.stream(
        model="demo",
        messages=CHAT,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=250,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _valid(call)


def test_auto_and_none_answer_in_text_when_the_model_writes_text(client):
    # The demo model's random text is no call: `auto` returns it as content, `none` never looks.
    for choice in ("auto", "none"):
        answer = client.chat.completions.create(
            model="demo", messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.choices[0].message.content
    streamed = client.chat.completions.create(
        model="demo", messages=CHAT, tools=TOOLS, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == answer.choices[0].message.content or text  # streamed as text, not held back forever


def test_a_tool_result_continues_the_conversation_with_its_prefix_reused(client):
    first = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    follow = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    second = client.chat.completions.create(
        model="demo", messages=follow, tools=TOOLS, max_tokens=6, temperature=0
    )
    assert second.choices[0].message.content
    # The tools and the question (the opening the two requests share) came from the cache.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 0.8 * first.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "has space", "parameters": WEATHER}}]},
            "tools.0.function.name",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "x", "parameters": {"not": {}}}}],
                "tool_choice": "required",
            },
            "not",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "messages": [
                    *CHAT,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_time", "arguments": "[1]"},
                            }
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
        ),
    ],
)
def test_bad_tool_fields_are_a_422_naming_the_field(server, extra, field):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 8, **extra}
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert field in response.text

"""The OpenAI-compatible API, driven by the official `openai` package over a real socket."""

from __future__ import annotations

import openai
import pytest
import requests

from bulk.errors import InvalidRequestError
from bulk.server.schemas import check_limits
from bulk.server.settings import ServerSettings

CHAT = [
    {"role": "system", "content": "You write short business plans for small shops."},
    {"role": "user", "content": "Create marketing strategy for a bakery"},
]
PROMPT = "Create a marketing strategy for a small bakery in Madrid, in three steps."


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_completions_report_cached_tokens_on_the_second_identical_request(client):
    first = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    assert first.object == "text_completion" and isinstance(first.choices[0].text, str)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.completion_tokens == 4 and first.choices[0].finish_reason == "length"
    second = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_and_its_cached_tokens(client):
    # Sampled (temperature 1, the OpenAI default): no response cache, but the prompt's KV is reused.
    first = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3, seed=7)
    assert first.choices[0].message.role == "assistant"
    assert isinstance(first.choices[0].message.content, str)
    second = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3, seed=7)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens == first.usage.prompt_tokens


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Stream me a slogan for a flower shop, please."}],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens is not None
    again = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Stream me a slogan for a flower shop, please."}],
        max_tokens=4,
        temperature=0,
    )
    assert again.choices[0].message.content == text


def test_completion_streaming_ends_with_done(server):
    body = {"prompt": "Stream a completion", "max_tokens": 3, "temperature": 0, "stream": True}
    response = requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=30)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines() if line]
    assert events[-1] == b"data: [DONE]" and all(e.startswith(b"data: ") for e in events)


def test_bad_input_is_a_422_naming_the_openai_field(client, server):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(model="demo", prompt="hi", max_tokens=100)
    assert "max_tokens" in str(caught.value)
    for body, field in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x" * 5000, "stream": True}, "prompt"),
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = requests.post(server.url + path, json=body, timeout=30)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["param"].startswith(field)


def test_a_conversation_counts_against_the_query_size_limit():
    settings = ServerSettings(model="demo", max_query_chars=10)
    check_limits({"messages": [{"role": "user", "content": "x" * 5}] * 2}, settings)
    with pytest.raises(InvalidRequestError) as caught:
        check_limits({"messages": [{"role": "user", "content": "x" * 6}] * 2}, settings)
    assert caught.value.field == "messages"

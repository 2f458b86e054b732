"""The logit-changing fields on the HTTP faces (OpenAI's `presence_penalty`, `frequency_penalty`,
`logit_bias`; vLLM's `repetition_penalty`, `stop_token_ids`; the same names on `/api/query`), bad
values refused naming the field, and OpenAI fields this server does not serve refused by name
instead of being dropped, over a real uvicorn socket and the official `openai` package."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.conftest import ENDS_EARLY

CHAT = [{"role": "user", "content": ENDS_EARLY}]
A = str(ord("A"))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _error(response: requests.Response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["error"]["param"]


def test_the_sdks_own_fields_change_the_tokens(client):
    def chat(**extra) -> str:
        answer = client.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=8, temperature=0, **extra
        )
        return answer.choices[0].message.content

    plain = chat()
    assert chat(logit_bias={A: 100}) == "A" * 8
    penalised = chat(frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain and len(set(penalised)) == len(penalised)
    assert chat(user="someone", metadata={"team": "a"}, store=False) == plain  # describe the caller only
    # vLLM's, as the SDK sends them (extra_body): the answer ends at the stop token.
    # (the raw prompt's greedy answer is "XXJXJXJX").
    stopped = client.completions.create(
        model="demo",
        prompt=ENDS_EARLY,
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [ord("J")]},
    )
    assert stopped.choices[0].text == "XX" and stopped.choices[0].finish_reason == "stop"
    assert chat(extra_body={"repetition_penalty": 1.8}) != plain


def test_completions_and_api_query_take_them_too(server, client):
    completion = client.completions.create(
        model="demo", prompt=ENDS_EARLY, max_tokens=6, temperature=0, logit_bias={A: 100}
    )
    assert completion.choices[0].text == "A" * 6
    body = {"query": ENDS_EARLY, "max_new_tokens": 6, "logit_bias": {A: 100}, "raw": True}
    assert requests.post(f"{server.url}/api/query", json=body, timeout=60).json()["result"] == "A" * 6
    body = {"query": ENDS_EARLY, "max_new_tokens": 6, "frequency_penalty": 2, "stop_token_ids": [1, 2]}
    assert requests.post(f"{server.url}/api/query", json=body, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # would overflow the logits
        ({"logit_bias": {"65": 100.5}}, "logit_bias"),
        ({"logit_bias": {"sixty": 1}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),  # beyond the demo model's 259 tokens
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"stop_token_ids": [259]}, "stop_token_ids"),
    ],
)
def test_bad_values_are_422s_naming_the_field_on_every_route(server, extra, field):
    assert _error(requests.post(f"{server.url}/api/query", json={"query": "q", **extra}, timeout=30)) == field
    chat = {"model": "demo", "messages": CHAT, **extra}
    assert _error(requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)) == field
    completion = {"model": "demo", "prompt": "q", **extra}
    assert _error(requests.post(f"{server.url}/v1/completions", json=completion, timeout=30)) == field


@pytest.mark.parametrize(
    ("path", "extra", "field"),
    [
        ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),  # the chat route's is a boolean
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/api/query", {"logprobs": 21}, "logprobs"),
    ],
)
def test_bad_logprobs_name_the_routes_own_field(server, path, extra, field):
    body = {"query": "q"} if path == "/api/query" else {"model": "demo", "prompt": "q", "messages": CHAT}
    if path == "/v1/completions":
        body.pop("messages")
    elif path == "/v1/chat/completions":
        body.pop("prompt")
    assert _error(requests.post(f"{server.url}{path}", json={**body, **extra}, timeout=30)) == field


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"made_up_field": 1}, "made_up_field"),
    ],
)
def test_openai_fields_not_served_are_refused_by_name(server, extra, field):
    for path, body in (
        ("/v1/chat/completions", {"model": "demo", "messages": CHAT}),
        ("/v1/completions", {"model": "demo", "prompt": "q"}),
    ):
        response = requests.post(f"{server.url}{path}", json={**body, **extra}, timeout=30)
        assert _error(response) == field
        assert "not served" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_tools_are_the_chat_routes_and_refused_on_completions(server, extra, field):
    # The chat route serves them (tests/server/test_openai_tools.py); raw completions have no turns.
    body = {"model": "demo", "prompt": "q", **extra}
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert _error(response) == field
    assert "not served" in response.json()["error"]["message"]


def test_what_asks_for_nothing_is_accepted(server):
    no_ops = {
        "user": "u",
        "store": False,
        "metadata": {"k": "v"},
        "echo": False,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "parallel_tool_calls": None,
        "n": 1,
    }
    for path, body in (
        ("/v1/chat/completions", {"model": "demo", "messages": CHAT}),
        ("/v1/completions", {"model": "demo", "prompt": "q"}),
    ):
        response = requests.post(f"{server.url}{path}", json={**body, **no_ops, "max_tokens": 2}, timeout=30)
        assert response.status_code == 200, response.text
    # `n` above its limit is refused, by name (tests/server/test_choices.py: below it).
    response = requests.post(
        f"{server.url}/v1/chat/completions", json={"model": "demo", "messages": CHAT, "n": 9}, timeout=30
    )
    assert _error(response) == "n"


def test_the_schema_states_the_new_fields(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()["components"]["schemas"]
    chat = schema["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    props = chat["properties"]
    assert (props["presence_penalty"]["minimum"], props["presence_penalty"]["maximum"]) == (-2, 2)
    assert props["top_logprobs"]["maximum"] == 20 and props["repetition_penalty"]["minimum"] == 0.01
    assert props["logit_bias"]["additionalProperties"] == {"minimum": -100, "maximum": 100}
    assert schema["CompletionRequest"]["properties"]["logprobs"]["maximum"] == 20
    assert schema["QueryRequest"]["properties"]["stop_token_ids"]["maxItems"] == 64

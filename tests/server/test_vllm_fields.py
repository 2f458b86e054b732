"""vLLM's extra sampling fields `ignore_eos` and `min_tokens` on the HTTP faces: `/api/query`,
`/api/batch`, the OpenAI routes (top-level body fields, as vLLM takes them) and the WebSocket. Their
meaning is tested on the engine (tests/engine/test_min_tokens.py); here, that every face hands them
to the engine, and that a bad one is a 422 naming it."""

from __future__ import annotations

import asyncio
import json

import pytest
import requests
import websockets

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from bulk.server.openai_schemas import ChatCompletionRequest, CompletionRequest
from tests.conftest import ENDS_EARLY
from tests.server.conftest import ENGINE, settings, wait_ready
from tests.server.live_server import LiveServer

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def eos_server(eos_model):
    """A server over `eos_model`, whose greedy answer to `ENDS_EARLY` ends after 2 tokens ("XX")."""
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**{**ENGINE, "dtype": "float32"}), model=eos_model)
    with LiveServer(create_app(settings(), engine=engine)) as live:
        wait_ready(live.url)
        yield live
    engine.shutdown()


def _query(url: str, **fields) -> tuple[str, int, str]:
    body = {"query": ENDS_EARLY, "max_new_tokens": 8, **fields}
    response = requests.post(f"{url}/api/query", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["result"], answer["completion_tokens"], answer["finish_reason"]


def test_api_query_takes_both(eos_server):
    assert _query(eos_server.url) == ("XX", 2, "stop")
    assert _query(eos_server.url, ignore_eos=True) == ("XXJXJXJX", 8, "length")
    assert _query(eos_server.url, min_tokens=5) == ("XXXXX", 5, "stop")


def test_openai_completions_take_both_as_top_level_fields(eos_server):
    def complete(**extra) -> dict:
        body = {"model": "demo", "prompt": ENDS_EARLY, "max_tokens": 8, "temperature": 0, **extra}
        response = requests.post(f"{eos_server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    plain, forced, held = complete(), complete(ignore_eos=True), complete(min_tokens=5)
    assert plain["usage"]["completion_tokens"] == 2 and plain["choices"][0]["finish_reason"] == "stop"
    assert forced["usage"]["completion_tokens"] == 8 and forced["choices"][0]["finish_reason"] == "length"
    assert forced["choices"][0]["text"] == "XXJXJXJX"
    assert held["usage"]["completion_tokens"] == 5 and held["choices"][0]["text"] == "XXXXX"


def test_openai_bodies_hand_both_to_the_engine():
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "min_tokens": 3}
    )
    completion = CompletionRequest.model_validate({"prompt": "hi", "ignore_eos": False, "min_tokens": 0})
    assert {"ignore_eos": True, "min_tokens": 3}.items() <= chat.engine_params().items()
    assert {"ignore_eos": False, "min_tokens": 0}.items() <= completion.engine_params().items()
    # Not given: not sent, so the engine's defaults apply.
    assert not {"ignore_eos", "min_tokens"} & CompletionRequest(prompt="hi").engine_params().keys()


def test_the_websocket_takes_both(eos_server):
    async def run():
        async with websockets.connect(f"{eos_server.ws_url}/ws/query") as ws:
            answers = []
            for extra in ({}, {"ignore_eos": True}, {"min_tokens": 5, "stream": True}):
                await ws.send(json.dumps({"query": ENDS_EARLY, "max_new_tokens": 8, **extra}))
                while "result" not in (answer := json.loads(await ws.recv())):
                    pass
                answers.append(answer)
            return answers

    plain, forced, held = asyncio.run(run())
    assert [a["completion_tokens"] for a in (plain, forced, held)] == [2, 8, 5]


def _error(response: requests.Response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["error"]["param"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"min_tokens": 5, "max_new_tokens": 4}, "min_tokens"),
        ({"min_tokens": 5}, "min_tokens"),  # above the server's default max_new_tokens (4)
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_values_are_422s_naming_the_field(server, extra, field):
    body = {"query": "Create marketing strategy", **extra}
    assert _error(requests.post(f"{server.url}/api/query", json=body, timeout=30)) == field
    assert _error(requests.post(f"{server.url}/api/batch", json=[body], timeout=30)) == f"0.{field}"
    chat = {
        "messages": [{"role": "user", "content": "Create marketing strategy"}],
        **{("max_tokens" if k == "max_new_tokens" else k): v for k, v in extra.items()},
    }
    assert _error(requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)) == field
    completion = {"prompt": "Create marketing strategy", **{k: v for k, v in chat.items() if k != "messages"}}
    assert _error(requests.post(f"{server.url}/v1/completions", json=completion, timeout=30)) == field


def test_min_tokens_is_checked_against_max_completion_tokens(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "max_completion_tokens": 2}
    response = requests.post(f"{server.url}/v1/chat/completions", json={**body, "min_tokens": 3}, timeout=30)
    assert _error(response) == "min_tokens"
    ok = requests.post(f"{server.url}/v1/chat/completions", json={**body, "min_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_the_schema_states_them(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=30).json()["components"]["schemas"]
    for name in ("QueryRequest", "CompletionRequest", "ChatCompletionRequest"):
        properties = schema[name]["properties"]
        assert properties["min_tokens"]["minimum"] == 0 and properties["min_tokens"]["maximum"] == 8, name
        assert {"type": "boolean"} in properties["ignore_eos"]["anyOf"], name

"""WebSocket /ws/query with the `websockets` package as the client."""

from __future__ import annotations

import asyncio
import json

import pytest
import requests
import websockets
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bulk.errors import EngineClosedError, ModelLoadError, TierError
from bulk.server import websocket
from bulk.server.errors import install_error_handlers
from tests.server.conftest import settings


def test_many_queries_streaming_and_a_malformed_message_on_one_socket(server):
    async def run():
        async with websockets.connect(f"{server.ws_url}/ws/query") as ws:
            # The guide's client: one query, one answer.
            await ws.send(json.dumps({"query": "Websocket-only query: a plan for a tea shop"}))
            first = json.loads(await ws.recv())
            # A malformed message: an error answer, and the socket stays open.
            await ws.send("{this is not json")
            broken = json.loads(await ws.recv())
            await ws.send(json.dumps({"query": "hi", "priority": "urgent"}))
            invalid = json.loads(await ws.recv())
            # The guide's server-side shape ({"text", "priority"}), streamed, with an id echoed.
            await ws.send(json.dumps({"text": "Stream a plan", "priority": 1, "stream": True, "id": 7}))
            streamed = []
            while True:
                message = json.loads(await ws.recv())
                streamed.append(message)
                if message.get("done"):
                    break
            await ws.send(json.dumps({"query": "Websocket-only query: a plan for a tea shop"}))
            again = json.loads(await ws.recv())
            return first, broken, invalid, streamed, again

    first, broken, invalid, streamed, again = asyncio.run(run())
    assert {"result", "cache_hit", "latency"} <= first.keys() and isinstance(first["result"], str)
    assert broken["error"]["param"] == "message" and "JSON" in broken["error"]["message"]
    assert broken["detail"][0]["loc"] == ["body", "message"] and broken["error"]["code"] == 422
    assert invalid["error"]["param"] == "priority" and invalid["error"]["type"] == "invalid_request_error"
    assert set(invalid) == {"detail", "error"}  # the HTTP body: no echo without an id
    tokens, final = streamed[:-1], streamed[-1]
    assert tokens and all("token" in m and m["id"] == 7 for m in tokens)
    assert final["id"] == 7 and final["result"] == "".join(m["token"] for m in tokens)
    assert again["cache_hit"] is True and again["result"] == first["result"]


# Bad fields the server and the engine check (not the HTTP schema, whose wording is pydantic's).
SAME_AS_HTTP = [
    {"query": "hi", "priority": 10**6},
    {"query": "   "},
    {"query": "hi", "max_new_tokens": 0},
    {"query": "hi", "temperature": -1},
]


@pytest.mark.parametrize("stream", [False, True])
def test_an_error_message_is_the_http_422_body_plus_the_id(server, stream):
    async def run():
        async with websockets.connect(f"{server.ws_url}/ws/query") as ws:
            answers = []
            for number, bad in enumerate(SAME_AS_HTTP):
                await ws.send(json.dumps({**bad, "id": f"q{number}", "stream": stream}))
                answers.append(json.loads(await ws.recv()))
            return answers

    answers = asyncio.run(run())
    for number, (bad, answer) in enumerate(zip(SAME_AS_HTTP, answers, strict=True)):
        http = requests.post(f"{server.url}/api/query", json=bad, timeout=30)
        assert http.status_code == 422, bad
        assert answer == {"id": f"q{number}", **http.json()}, bad


def test_a_type_error_has_the_http_shape_and_names_the_field(server):
    async def run():
        async with websockets.connect(f"{server.ws_url}/ws/query") as ws:
            await ws.send(json.dumps({"query": 5}))
            return json.loads(await ws.recv())

    answer = asyncio.run(run())
    http = requests.post(f"{server.url}/api/query", json={"query": 5}, timeout=30).json()
    assert answer.keys() == http.keys() == {"detail", "error"}
    assert answer["error"].keys() == http["error"].keys()
    assert answer["error"]["param"] == http["error"]["param"] == "query"
    assert answer["error"]["code"] == http["error"]["code"] == 422
    assert answer["detail"][0]["loc"] == http["detail"][0]["loc"] == ["body", "query"]


class _Socket:
    def __init__(self):
        self.sent = []

    async def send_json(self, data):
        self.sent.append(data)


class _FailingEngine:
    def __init__(self, error):
        self.error = error

    async def process_request(self, request):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        EngineClosedError("closed"),
        ModelLoadError("no such file"),
        TierError("redis down"),
        RuntimeError("a bug, with private text"),
    ],
)
def test_an_engine_failure_is_the_http_503_or_500_body(error):
    # The HTTP answer to the same exception, from the app's own handlers.
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/fail")
    async def fail():
        raise error

    http = TestClient(app, raise_server_exceptions=False).post("/fail")
    socket = _Socket()
    raw = json.dumps({"query": "hi", "id": 3})
    asyncio.run(websocket._answer(socket, raw, _FailingEngine(error), settings(), None))
    assert http.status_code == (500 if isinstance(error, RuntimeError) else 503)
    assert socket.sent == [{"id": 3, **http.json()}]
    assert "private" not in json.dumps(socket.sent)

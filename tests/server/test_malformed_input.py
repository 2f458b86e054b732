"""Malformed input over real sockets: every bad WebSocket message gets an error message and the socket
stays usable; deeply nested JSON on every HTTP route is a 422 naming the body, never a 400 without
our error shape, a 500 or a dropped connection."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import requests
import websockets

from bulk.server.app import create_app
from tests.server.conftest import settings, wait_ready
from tests.server.live_server import LiveServer

DEEP = "[" * 50_000


@pytest.fixture(scope="module")
def live(api_engine):
    # The default body and message limit (1 MiB), so that 50,000 brackets reach the parser.
    with LiveServer(create_app(settings(), engine=api_engine)) as live:
        wait_ready(live.url)
        yield live


MALFORMED = [
    (DEEP, "message"),  # the probe's message: a RecursionError in Python's json module
    ('{"query": "hi", "id": ' + DEEP, "message"),
    (b"\xff\xfe not UTF-8", "message"),  # a binary frame
    ("1" * 5000, "message"),  # a number too long to convert
    ("", "message"),
    ('"just a string"', "message"),
    ("null", "message"),
    ('{"query": 5}', "query"),
    ('{"query": "hi", "stream": "yes"}', "stream"),
    ('{"query": "hi", "temperature": 1e999}', "temperature"),
]


def test_every_malformed_websocket_message_is_answered_and_the_socket_stays_usable(live, caplog):
    async def run():
        async with websockets.connect(f"{live.ws_url}/ws/query", max_size=None) as ws:
            answers = []
            for message, _ in MALFORMED:
                await ws.send(message)
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send(json.dumps({"query": "still answering after all that", "id": "last"}))
            return answers, json.loads(await asyncio.wait_for(ws.recv(), 60))

    with caplog.at_level(logging.WARNING):
        answers, last = asyncio.run(run())
    for (message, field), answer in zip(MALFORMED, answers, strict=True):
        # The body an HTTP 422 carries for the same bad field.
        assert set(answer) == {"detail", "error"}, (message[:40], answer)
        assert answer["error"]["param"] == field and answer["error"]["code"] == 422, (message[:40], answer)
        assert answer["error"]["message"].startswith(f"{field}: ")
        assert answer["detail"] == [
            {"loc": ["body", field], "msg": answer["error"]["message"], "type": "value_error"}
        ]
    assert "JSON" in answers[0]["error"]["message"]
    assert last["id"] == "last" and isinstance(last["result"], str) and "error" not in last
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def _json_routes(url: str) -> list[str]:
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    return sorted(
        path
        for path, operations in paths.items()
        if "application/json" in operations.get("post", {}).get("requestBody", {}).get("content", {})
    )


@pytest.mark.parametrize("body", [DEEP, '{"query": ' + DEEP, '{"prompt": "x", "stop": ' + DEEP + "]}"])
def test_deeply_nested_json_on_every_http_route_is_a_422(live, body):
    routes = _json_routes(live.url)
    assert {"/api/query", "/api/batch", "/v1/completions", "/v1/chat/completions"} <= set(routes)
    for route in routes:
        response = requests.post(
            f"{live.url}{route}", data=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert response.status_code == 422, (route, response.status_code, response.text[:200])
        error = response.json()["error"]
        assert error["param"] == "body" and "JSON" in error["message"], (route, error)
    # Served as usual afterwards.
    ok = requests.post(f"{live.url}/api/query", json={"query": "after the brackets"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["result"]


def test_a_bad_query_in_a_batch_is_the_batchs_422_naming_it(live):
    batch = [{"query": "fine"}, {"query": "too many tokens", "max_new_tokens": 0}]
    response = requests.post(f"{live.url}/api/batch", json=batch, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["param"] == "1.max_new_tokens"

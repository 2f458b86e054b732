"""A non-streaming request whose client has gone is cancelled at the engine's next step, as a stream's
is: `/api/query`, `/v1/completions` and `/v1/chat/completions` over a real uvicorn socket, on an
engine slowed to 10 ms a token so that an answer nobody cancels would take 10 s. Then the pieces of
`until_disconnected`: an answer ready at once starts no watch, another task's cancellation is not
taken for a disconnect."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
import requests

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server import disconnect
from bulk.server.app import create_app
from bulk.server.disconnect import ClientDisconnectedError, until_disconnected
from tests.helpers import wait_until
from tests.server.conftest import ENGINE, settings, wait_ready
from tests.server.live_server import LiveServer

MAX_TOKENS = 1000
SECONDS_PER_TOKEN = 0.01
PROMPT = "A request nobody waits for any more"


@pytest.fixture(scope="module")
def slow(demo_model):
    """A live server over an engine whose every token takes `SECONDS_PER_TOKEN` on the model thread."""

    def slow_down(seq, logits):
        time.sleep(SECONDS_PER_TOKEN)

    limits = {"max_new_tokens_limit": MAX_TOKENS, "response_cache": False}
    config = KVCacheConfig(**{**ENGINE, **limits})
    engine = UltraAdaptiveKVCacheEngine(config, model=demo_model, logits_observer=slow_down)
    try:
        with LiveServer(create_app(settings(**limits), engine=engine)) as live:
            wait_ready(live.url)
            yield live, engine
    finally:
        engine.shutdown()


BODIES = {
    "/api/query": {"query": PROMPT, "max_new_tokens": MAX_TOKENS, "ignore_eos": True},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    },
}


def _send(port: int, path: str, body: dict) -> socket.socket:
    """A whole HTTP request on a raw socket, left open without reading the answer."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + payload)
    return sock


def _decoded(engine: UltraAdaptiveKVCacheEngine) -> int:
    return engine.get_stats()["batch"]["decode_rows"]


@pytest.mark.parametrize("path", list(BODIES))
def test_a_request_whose_client_left_is_cancelled_at_the_next_step(slow, path, caplog):
    live, engine = slow
    before = engine.get_stats()
    sock = _send(live.port, path, BODIES[path])
    # Under way: admitted and decoding.
    started = before["batch"]["decode_rows"]
    wait_until(lambda: engine.get_stats()["running"] == 1 and _decoded(engine) > started + 5)
    with caplog.at_level(logging.INFO, logger="bulk"):
        sock.close()
        closed = time.monotonic()
        wait_until(lambda: engine.get_stats()["running"] == 0, 5, 0.01, "the request to be cancelled")
        stopped = time.monotonic() - closed
        decoded = _decoded(engine)
        time.sleep(0.2)
    after = engine.get_stats()
    # Retired within a few steps of the disconnect, nowhere near its 1000 tokens (10 s), and nothing
    # decoded since: its slot is free.
    assert stopped < 2.0
    assert decoded - started < MAX_TOKENS // 4
    assert _decoded(engine) == decoded and after["running"] == 0 and after["queue_depth"] == 0
    # A cancelled request is not an answer: no completion counted, no error either.
    assert after["requests"] == before["requests"] and after["errors"] == before["errors"]
    assert after["completion_tokens"] == before["completion_tokens"]
    wait_until(lambda: "disconnected: request cancelled" in caplog.text, 5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # The server serves on: a short request on a new connection is answered.
    short = {**BODIES[path], ("max_tokens" if path.startswith("/v1") else "max_new_tokens"): 2}
    assert requests.post(f"{live.url}{path}", json=short, timeout=30).status_code == 200


def test_a_client_that_waits_gets_its_answer(slow):
    live, _ = slow
    answer = requests.post(f"{live.url}/api/query", json={"query": PROMPT, "max_new_tokens": 20}, timeout=30)
    assert answer.status_code == 200 and answer.json()["completion_tokens"] == 20


class _Request:
    """What `until_disconnected` reads of a Starlette request."""

    method = "POST"

    class url:
        path = "/api/query"

    def __init__(self, disconnect_after: float | None = None) -> None:
        self.disconnect_after = disconnect_after
        self.receives = 0

    async def receive(self) -> dict:
        self.receives += 1
        if self.disconnect_after is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(self.disconnect_after)
        return {"type": "http.disconnect"}


async def test_an_answer_ready_at_once_starts_no_watch():
    async def ready() -> str:
        return "cached"

    request = _Request(disconnect_after=0)
    tasks = len(asyncio.all_tasks())
    assert await until_disconnected(request, ready()) == "cached"
    await asyncio.sleep(0.01)
    assert request.receives == 0 and len(asyncio.all_tasks()) == tasks


async def test_a_disconnect_cancels_the_work_and_is_typed():
    cancelled = asyncio.Event()

    async def long() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    with pytest.raises(ClientDisconnectedError):
        await until_disconnected(_Request(disconnect_after=0.01), long())
    assert cancelled.is_set()
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # our own cancellation is undone


async def test_another_cancellation_is_not_taken_for_a_disconnect():
    request = _Request(disconnect_after=None)

    async def route() -> None:
        await until_disconnected(request, asyncio.sleep(30))

    task = asyncio.create_task(route())
    await asyncio.sleep(0.01)
    assert request.receives == 1  # the watch is waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if "_wait" in repr(t)] == []  # the watch stopped too
    assert disconnect.CLIENT_CLOSED_REQUEST == 499

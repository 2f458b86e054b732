"""Requests without a valid API key are rate-limited per client address (429 with Retry-After, like
any other limit), without ever refusing a valid key. Real uvicorn sockets; the second address is
127.0.0.2, which reaches the server on 127.0.0.1 over the loopback interface."""

from __future__ import annotations

import asyncio
import http.client
import json

import pytest
import requests
import websockets

from bulk.server.app import create_app
from tests.server.conftest import settings, wait_ready
from tests.server.live_server import LiveServer

KEY = "flood-test-key"
BURST = 3


def _serve(api_engine, **overrides):
    app = create_app(settings(api_keys=[KEY], **overrides), engine=api_engine)
    return LiveServer(app)


def _post(url: str, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/api/query", json={"query": "flood"}, headers=headers, timeout=60)


def _post_from(port: int, source: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request(
            "POST", "/api/query", body='{"query": "flood"}', headers={"content-type": "application/json"}
        )
        return connection.getresponse().status
    finally:
        connection.close()


def test_an_unauthenticated_flood_gets_429_per_address_and_valid_keys_pass(api_engine):
    # No per-key rate limit at all: only requests without a valid key are limited.
    with _serve(
        api_engine, unauthenticated_rate_limit_per_minute=1, unauthenticated_rate_limit_burst=BURST
    ) as live:
        wait_ready(live.url)
        first = [_post(live.url).status_code for _ in range(BURST - 1)] + [
            _post(live.url, "wrong").status_code
        ]
        assert first == [401] * BURST
        flooded = _post(live.url)
        assert flooded.status_code == 429 and int(flooded.headers["retry-after"]) >= 1
        assert "API key" in flooded.json()["error"]["message"]
        assert _post(live.url, "a wrong key too").status_code == 429
        # A valid key from the same address is never refused by this limit...
        assert all(_post(live.url, KEY).status_code == 200 for _ in range(BURST + 2))
        # ...and another address has a budget of its own.
        assert _post_from(live.port, "127.0.0.2") == 401

        async def websocket_handshake() -> int:
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with websockets.connect(f"{live.ws_url}/ws/query"):
                    pass
            return refused.value.response.status_code

        assert asyncio.run(websocket_handshake()) == 403  # refused before the handshake, as any refusal

        async def websocket_with_key() -> dict:
            headers = {"Authorization": f"Bearer {KEY}"}
            async with websockets.connect(f"{live.ws_url}/ws/query", additional_headers=headers) as ws:
                await ws.send(json.dumps({"query": "through the flood"}))
                return json.loads(await ws.recv())

        assert "result" in asyncio.run(websocket_with_key())


def test_zero_turns_the_unauthenticated_limit_off(api_engine):
    with _serve(
        api_engine, unauthenticated_rate_limit_per_minute=0, unauthenticated_rate_limit_burst=1
    ) as live:
        wait_ready(live.url)
        assert [_post(live.url).status_code for _ in range(5)] == [401] * 5


def test_without_keys_the_setting_changes_nothing(api_engine):
    app = create_app(
        settings(unauthenticated_rate_limit_per_minute=1, unauthenticated_rate_limit_burst=1),
        engine=api_engine,
    )
    with LiveServer(app) as live:
        wait_ready(live.url)
        assert [_post(live.url).status_code for _ in range(3)] == [200] * 3

"""API keys, per-key rate limits and the health check while the model loads."""

from __future__ import annotations

import asyncio
import threading

import pytest
import requests
import websockets

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.model_thread import ModelThread
from bulk.server.app import create_app
from tests.server.conftest import ENGINE, settings
from tests.server.live_server import LiveServer


def _post(url: str, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/api/query", json={"query": "protected"}, headers=headers, timeout=30)


def test_keys_are_required_and_checked(protected_server):
    url = protected_server.url
    missing = _post(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "API key" in missing.json()["error"]["message"]
    assert _post(url, "wrong-key").status_code == 401
    # Health and metrics stay open (load balancers, Prometheus).
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert requests.get(f"{url}/metrics", timeout=5).status_code == 200


def test_rate_limit_per_key_answers_429_with_retry_after(protected_server):
    url = protected_server.url
    codes = [_post(url, "key-one").status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    limited = _post(url, "key-one")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # Another key has its own budget.
    assert _post(url, "key-two").status_code == 200


def test_websocket_needs_a_key_too(protected_server):
    async def run():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(f"{protected_server.ws_url}/ws/query"):
                pass
        async with websockets.connect(
            f"{protected_server.ws_url}/ws/query", additional_headers={"Authorization": "Bearer key-two"}
        ) as ws:
            await ws.send('{"query": "over a protected socket"}')
            return refused.value.response.status_code, await ws.recv()

    status, answer = asyncio.run(run())
    assert status == 403 and "result" in answer


def test_health_is_503_while_the_model_loads(demo_model):
    # The model thread is busy with another job, so the warmup queued behind it cannot finish yet.
    worker = ModelThread(name="busy-model-thread")
    release = threading.Event()
    worker.submit(release.wait, 0)
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=demo_model, model_thread=worker)
    try:
        with LiveServer(create_app(settings(), engine=engine)) as live:
            loading = requests.get(f"{live.url}/health", timeout=5)
            assert loading.status_code == 503 and loading.json()["status"] == "loading"
            release.set()
            deadline = 200
            while requests.get(f"{live.url}/health", timeout=5).status_code != 200 and deadline:
                deadline -= 1
                threading.Event().wait(0.05)
            assert requests.get(f"{live.url}/health", timeout=5).json() == {"status": "ok", "model": "demo"}
    finally:
        release.set()
        engine.shutdown()
        worker.shutdown(wait=True)

"""`BUL_CACHE_MIDDLEWARE=true`: whole HTTP answers kept in the engine's response cache, keyed by
method, path and body, over a real socket."""

from __future__ import annotations

import pytest
import requests

from bulk.server.app import create_app
from tests.server.conftest import settings, wait_ready
from tests.server.live_server import LiveServer


@pytest.fixture(scope="module")
def cached_server(api_engine):
    app = create_app(settings(cache_middleware=True, max_body_bytes=16384), engine=api_engine)
    with LiveServer(app) as live:
        wait_ready(live.url)
        yield live


def test_a_repeated_body_is_served_from_the_stored_bytes(cached_server, api_engine):
    url = f"{cached_server.url}/api/query"
    body = {"query": "cache middleware: the same body twice", "max_new_tokens": 2}
    first = requests.post(url, json=body, timeout=60)
    assert first.status_code == 200 and first.headers.get("x-bul-cache") != "hit"
    before = api_engine.get_stats()["requests"]
    again = requests.post(url, json=body, timeout=60)
    assert again.status_code == 200
    assert again.headers["x-bul-cache"] == "hit" and again.headers["content-type"] == "application/json"
    assert again.content == first.content  # the first answer's bytes: its request id and latency
    assert api_engine.get_stats()["requests"] == before  # the engine was not asked

    other = requests.post(url, json={**body, "max_new_tokens": 3}, timeout=60)
    assert other.headers.get("x-bul-cache") != "hit"
    assert other.json()["request_id"] != first.json()["request_id"]


def test_only_the_query_paths_are_cached(cached_server):
    for _ in range(2):
        health = requests.get(f"{cached_server.url}/health", timeout=10)
        assert health.status_code == 200 and "x-bul-cache" not in health.headers


def test_an_oversized_body_is_refused_before_the_cache(cached_server):
    # The body limit runs first: the cache never reads, hashes or stores a body over the limit.
    for _ in range(2):
        big = requests.post(f"{cached_server.url}/api/query", json={"query": "x" * 20_000}, timeout=10)
        assert big.status_code == 413 and "x-bul-cache" not in big.headers
        assert big.json()["error"]["code"] == 413 and "BUL_MAX_BODY_BYTES" in big.json()["detail"]

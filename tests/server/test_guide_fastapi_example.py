"""The guide's FastAPI samples (examples/fastapi_guide.py), served by uvicorn on a free port and called
over a real socket: the basic query route, its CacheMiddleware and the background batch."""

from __future__ import annotations

import importlib

import pytest
import requests

from tests.helpers import wait_until
from tests.server.live_server import LiveServer

# The guide's `@app.on_event("startup")` still works; FastAPI only warns that lifespan is preferred.
pytestmark = pytest.mark.filterwarnings("ignore:\\s*on_event is deprecated:DeprecationWarning")

QUERY = {"query": "Create marketing strategy", "priority": 1, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def guide():
    module = importlib.import_module("examples.fastapi_guide")
    try:
        with LiveServer(module.app) as live:
            # The guide's app has no /health; its startup hook has warmed the engine once this answers.
            wait_until(lambda: module.cache_engine.ready, 60, message="the guide's startup warmup")
            yield module, live
    finally:
        module.cache_engine.shutdown()


def test_the_guides_query_route(guide):
    _, live = guide
    answer = requests.post(f"{live.url}/api/query", json=QUERY, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {"result", "cache_hit", "latency"} <= body.keys() and body["completion_tokens"] == 4


def test_bad_input_is_a_422_not_a_500(guide):
    _, live = guide
    answer = requests.post(f"{live.url}/api/query", json={"query": "hi", "max_new_tokens": 0}, timeout=30)
    assert answer.status_code == 422 and "max_new_tokens" in answer.json()["detail"]


def test_the_cache_middleware_serves_stored_answers_per_body(guide):
    module, live = guide
    other = {**QUERY, "query": "Summarise the quarterly sales report"}
    first = requests.post(f"{live.url}/api/query", json=other, timeout=60).json()
    again = requests.post(f"{live.url}/api/query", json=other, timeout=60).json()
    # The stored bytes come back as they were: the first answer's request id and latency.
    assert again == first
    # A different body is a different key: never the other query's answer.
    different = requests.post(f"{live.url}/api/query", json={**other, "max_new_tokens": 3}, timeout=60).json()
    assert different["request_id"] != first["request_id"] and different["completion_tokens"] == 3
    requests_before = module.cache_engine.get_stats()["requests"]
    requests.post(f"{live.url}/api/query", json=other, timeout=60)
    assert module.cache_engine.get_stats()["requests"] == requests_before  # the engine was not asked


def test_the_background_batch_runs_after_answering(guide):
    module, live = guide
    before = module.cache_engine.get_stats()["requests"]
    batch = [{"query": f"guide background {i}", "max_new_tokens": 4} for i in range(2)]
    answer = requests.post(f"{live.url}/api/batch", json=batch, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"status": "processing", "count": 2}
    wait_until(
        lambda: module.cache_engine.get_stats()["requests"] >= before + 2, 60, message="the background tasks"
    )

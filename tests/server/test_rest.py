"""The guide's REST routes over a real socket, through the guide's BULAPIClient."""

from __future__ import annotations

import asyncio

import pytest
import requests

from bulk.client import AsyncBULAPIClient, BULAPIClient, BULAPIError
from tests.helpers import wait_until


def test_the_guides_client_calls(server):
    client = BULAPIClient(server.url)
    first = client.process_query("Create marketing strategy")
    assert {"result", "cache_hit", "latency", "cached_tokens", "prompt_tokens"} <= first.keys()
    assert isinstance(first["result"], str) and first["completion_tokens"] <= 4
    # The same deterministic query again: answered from the response cache.
    second = client.process_query("Create marketing strategy")
    assert second["cache_hit"] and second["response_cached"] and second["result"] == first["result"]
    stats = client.get_stats()
    assert stats["requests"] >= 2 and stats["response_cache_hits"] >= 1 and stats["ready"]


def _finished(status: dict) -> dict | None:
    return None if status["status"] == "processing" else status


def test_batch_returns_at_once_and_tasks_complete(server):
    client = BULAPIClient(server.url)
    accepted = client.process_batch([{"query": "batch one"}, {"text": "batch two", "priority": 3}])
    assert accepted["status"] == "processing" and accepted["count"] == 2 and len(accepted["task_ids"]) == 2
    for task_id in accepted["task_ids"]:
        status = wait_until(lambda t=task_id: _finished(client.get_task_status(t)), message="the task")
        assert status["status"] == "completed" and status["task_id"] == task_id
        assert isinstance(status["result"]["result"], str)
        assert requests.get(f"{server.url}/api/task/{task_id}").json() == status


def test_a_failed_batch_task_reports_its_error(server):
    client = BULAPIClient(server.url)
    # Valid types, but longer than the demo model's context: fails on the model thread, not at once.
    task_id = client.process_batch([{"query": "x" * 5000}])["task_ids"][0]
    status = wait_until(lambda: _finished(client.get_task_status(task_id)), message="the task")
    assert status["status"] == "failed" and "query" in status["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": "hi", "priority": 10**6}, "priority"),
        ({"query": "hi", "priority": "high"}, "priority"),
        ({"query": "hi", "max_new_tokens": 9}, "max_new_tokens"),
        ({"query": "hi", "temperature": 9.0}, "temperature"),
        ({"query": "hi", "colour": "red"}, "colour"),
        ({"query": ""}, "query"),
        ({}, "query"),
        ({"query": 42}, "query"),
        ({"query": "x" * 5000}, "query"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(server, body, field):
    response = requests.post(f"{server.url}/api/query", json=body, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field or field in error["message"], error


def test_client_errors_carry_the_servers_message(server):
    with pytest.raises(BULAPIError) as caught:
        BULAPIClient(server.url).process_query("hi", priority=10**6)
    assert caught.value.status_code == 422 and caught.value.field == "priority"
    assert "between" in caught.value.message
    with pytest.raises(BULAPIError) as missing:
        BULAPIClient(server.url).get_task_status("no-such-task")
    assert missing.value.status_code == 404 and "no-such-task" in missing.value.message


def test_malformed_json_and_oversized_bodies(server):
    broken = requests.post(
        f"{server.url}/api/query", data=b"{not json", headers={"content-type": "application/json"}, timeout=10
    )
    assert broken.status_code == 422
    huge = requests.post(f"{server.url}/api/query", json={"query": "x" * 20_000}, timeout=10)
    assert huge.status_code == 413  # the test server's body limit is 16 KiB
    assert requests.post(f"{server.url}/api/batch", json=[], timeout=10).status_code == 422


def test_health_and_the_async_client(server):
    assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"

    async def run():
        async with AsyncBULAPIClient(server.url) as client:
            answers = await asyncio.gather(*(client.process_query(f"async query {i}") for i in range(3)))
            stats = await client.get_stats()
            with pytest.raises(BULAPIError) as caught:
                await client.process_query("hi", max_new_tokens=0)
            return answers, stats, caught.value

    answers, stats, error = asyncio.run(run())
    assert all(isinstance(a["result"], str) for a in answers) and stats["requests"] >= 3
    assert error.status_code == 422 and error.field == "max_new_tokens"

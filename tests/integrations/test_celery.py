"""The Celery integration against a real `bul worker` process on the real Redis (database 13)."""

from __future__ import annotations

import uuid

import pytest
from celery.result import AsyncResult
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bulk.integrations.celery.settings import celery_settings
from bulk.integrations.celery.tasks import backoff_seconds, batch_process_task, process_document_task
from bulk.server.celery_routes import celery_task_status, router, task_status_router
from tests.helpers import wait_until
from tests.integrations.celery_test_tasks import flaky_document_task

pytestmark = pytest.mark.usefixtures("bul_worker")
TIMEOUT_S = 60


def send_flaky(query: dict, failures: int, redis13) -> tuple[AsyncResult, str]:
    counter_key = f"flaky-{uuid.uuid4().hex}"
    task = flaky_document_task.delay(query, failures, counter_key)
    return task, counter_key


def wait_for_status(task_id: str, status: str) -> dict:
    def reached() -> dict | None:
        answer = celery_task_status(task_id)
        assert answer is not None
        return answer if answer["status"] == status else None

    return wait_until(reached, TIMEOUT_S, 0.1, f"task {task_id} to be {status!r}")


def test_document_task_returns_the_engine_result_from_an_engine_built_once():
    query = {"query": "The quick brown fox", "max_new_tokens": 4}
    first = process_document_task.delay(query).get(timeout=TIMEOUT_S)
    assert first["model"] == "demo"
    assert first["completion_tokens"] == 4
    assert first["prompt_tokens"] > 0
    assert isinstance(first["result"], str) and first["result"]
    assert first["response_cached"] is False
    # The second identical request is answered from the same engine's response cache: the engine
    # outlives a task (built once per worker process), it is not rebuilt per task.
    second = process_document_task.delay(query).get(timeout=TIMEOUT_S)
    assert second["response_cached"] is True
    assert second["result"] == first["result"]


def test_vllms_sampling_fields_reach_the_workers_engine(redis13):
    """`ignore_eos` and `min_tokens` cross the broker as JSON and are the engine's to check."""
    query = {"query": "The quick brown fox", "max_new_tokens": 6, "min_tokens": 6, "ignore_eos": True}
    answer = process_document_task.delay(query).get(timeout=TIMEOUT_S)
    assert answer["completion_tokens"] == 6 and answer["finish_reason"] == "length"
    task, _ = send_flaky({**query, "min_tokens": 7}, failures=0, redis13=redis13)
    assert wait_for_status(task.id, "failed")["error"].startswith("min_tokens:")


def test_logprobs_and_logit_changes_reach_the_workers_engine(redis13):
    """The engine's `logprobs` list crosses the broker back as JSON; `logit_bias` and the penalties
    cross it as request fields (+100 forces its token)."""
    query = {"query": "The quick brown fox", "max_new_tokens": 4, "raw": True, "logprobs": 2}
    answer = process_document_task.delay({**query, "logit_bias": {str(ord("A")): 100}}).get(timeout=TIMEOUT_S)
    assert answer["result"] == "AAAA" and [e["token"] for e in answer["logprobs"]] == ["A"] * 4
    assert all(len(e["top_logprobs"]) == 2 for e in answer["logprobs"])
    task, _ = send_flaky({**query, "frequency_penalty": 3}, failures=0, redis13=redis13)
    assert wait_for_status(task.id, "failed")["error"].startswith("frequency_penalty:")


def test_bad_input_fails_at_once_without_retries(redis13):
    task, counter_key = send_flaky({"query": "", "max_new_tokens": 4}, failures=0, redis13=redis13)
    answer = wait_for_status(task.id, "failed")
    assert answer["error"].startswith("query:")
    assert int(redis13.get(counter_key)) == 1  # one attempt: input errors are not retried

    real = process_document_task.delay({"query": "hi", "bogus": 1})
    answer = wait_for_status(real.id, "failed")
    assert answer["error"].startswith("bogus:")


def test_task_failing_twice_is_retried_then_succeeds(redis13):
    task, counter_key = send_flaky({"query": "retry me", "max_new_tokens": 4}, failures=2, redis13=redis13)
    result = task.get(timeout=TIMEOUT_S)
    assert result["completion_tokens"] == 4
    assert int(redis13.get(counter_key)) == 3  # two failures, then success
    assert celery_task_status(task.id)["status"] == "completed"


def test_task_that_always_fails_ends_failed_after_three_retries(redis13):
    task, counter_key = send_flaky({"query": "doomed", "max_new_tokens": 4}, failures=100, redis13=redis13)
    answer = wait_for_status(task.id, "failed")
    assert int(redis13.get(counter_key)) == 4  # the first attempt and three retries
    assert answer["error"] == "simulated outage on attempt 4"
    with pytest.raises(ConnectionError, match="attempt 4"):
        task.get(timeout=1)


def test_batch_task_returns_one_result_per_query():
    queries = [{"query": f"document number {i}", "max_new_tokens": 4} for i in range(3)]
    results = batch_process_task.delay(queries).get(timeout=TIMEOUT_S)
    assert len(results) == 3
    assert all(r["completion_tokens"] == 4 and r["model"] == "demo" for r in results)
    assert len({r["request_id"] for r in results}) == 3


def test_batch_with_a_bad_query_fails_naming_it():
    task = batch_process_task.delay([{"query": "fine", "max_new_tokens": 4}, {"query": 5}])
    answer = wait_for_status(task.id, "failed")
    assert answer["error"].startswith("queries[1].query:")
    not_a_list = batch_process_task.delay({"query": "x"})
    assert wait_for_status(not_a_list.id, "failed")["error"].startswith("queries:")


def test_unknown_task_id_is_unknown_not_pending():
    assert celery_task_status(str(uuid.uuid4())) is None


@pytest.fixture
def client():
    app = FastAPI()
    app.include_router(router)
    app.include_router(task_status_router)
    with TestClient(app) as c:
        yield c


def test_process_endpoint_round_trip(client):
    body = {"query": "Hello from the API", "priority": 1, "max_new_tokens": 4}
    response = client.post("/api/process", json=body)
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    body = wait_until(
        lambda: _finished(client.get(f"/api/task/{task_id}").json()), TIMEOUT_S, 0.1, "the task"
    )
    assert body["task_id"] == task_id
    assert body["status"] == "completed", body
    assert {"result", "cache_hit", "latency", "model"} <= set(body["result"])
    again = client.get(f"/api/task/{task_id}/status").json()
    assert again == body


def test_process_endpoint_rejects_bad_input_with_422(client):
    response = client.post("/api/process", json={"query": "x", "priority": "high"})
    assert response.status_code == 422
    assert "priority" in response.text
    assert client.post("/api/process", json={"text": ""}).status_code == 422
    not_json = client.post("/api/process", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    assert client.get(f"/api/task/{uuid.uuid4()}").status_code == 404


def test_engine_was_built_once_in_the_worker_child(bul_worker):
    log = bul_worker.read_text(errors="replace")
    built = [line for line in log.splitlines() if "building the engine" in line]
    assert len(built) == 1, log[-3000:]
    assert "ForkPoolWorker" in built[0]  # in worker_process_init of the prefork child, not the parent


def test_backoff_is_exponential_with_jitter_and_capped():
    settings = celery_settings()
    for retries in range(6):
        ceiling = min(settings.retry_backoff * 2**retries, settings.retry_backoff_max)
        delays = {backoff_seconds(retries) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert backoff_seconds(50) <= settings.retry_backoff_max


def test_process_round_trip_through_bul_serve_app_with_celery_on(demo_model):
    from bulk.config import KVCacheConfig
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine
    from bulk.server.app import create_app
    from bulk.server.settings import ServerSettings

    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu"), model=demo_model)
    app = create_app(ServerSettings(celery=True, model="demo", device="cpu"), engine=engine)
    try:
        with TestClient(app) as client:
            response = client.post("/api/process", json={"query": "through bul serve", "max_new_tokens": 4})
            assert response.status_code == 200, response.text
            task_id = response.json()["task_id"]
            body = wait_until(
                lambda: _finished(client.get(f"/api/task/{task_id}/status").json()),
                TIMEOUT_S,
                0.1,
                "the task",
            )
            assert body["status"] == "completed", body
            assert body["result"]["completion_tokens"] == 4
            assert client.get(f"/api/task/{task_id}").json() == body
            bad = client.post("/api/process", json={"query": "x", "top_p": "wide"})
            assert bad.status_code == 422 and "top_p" in bad.text
            assert client.get(f"/api/task/{uuid.uuid4()}").status_code == 404
    finally:
        engine.shutdown()


def _finished(status: dict) -> dict | None:
    return None if status["status"] == "processing" else status

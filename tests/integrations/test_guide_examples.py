"""The guide's Celery, Django and Flask samples (examples/), run as they are: the Celery sample through a
real worker of its own app, the Flask and Django samples through their test clients."""

from __future__ import annotations

import importlib
import sys

import pytest
from fastapi.testclient import TestClient

from tests.helpers import wait_until
from tests.integrations.conftest import BROKER_URL, start_worker, stop_worker, worker_env

GUIDE_FIELDS = {"result", "cache_hit", "latency"}
# The sample app shares database 13 with the bul_tasks tests: its own queue keeps the two workers apart.
GUIDE_QUEUE = "bul-guide"


@pytest.fixture(scope="module")
def celery_guide(redis13, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUL_BROKER_URL", BROKER_URL)
        mp.setenv("BUL_RESULT_BACKEND", BROKER_URL)
        module = importlib.import_module("examples.celery_guide")
    module.celery_app.conf.task_default_queue = GUIDE_QUEUE
    assert module.celery_app.conf.broker_url == BROKER_URL
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "examples.celery_guide:celery_app",
        "worker",
        "--pool=solo",
        f"--queues={GUIDE_QUEUE}",
        "--hostname=bul-guide@%h",
        "--loglevel=info",
    ]
    proc = start_worker(argv, tmp_path_factory.mktemp("celery-guide") / "worker.log", worker_env())
    try:
        yield module
    finally:
        stop_worker(proc)


def test_celery_guide_tasks_run_on_a_real_worker(celery_guide):
    result = celery_guide.process_document_task.delay({"query": "guide task", "max_new_tokens": 4}).get(
        timeout=60
    )
    assert set(result) >= GUIDE_FIELDS and result["completion_tokens"] == 4
    batch = celery_guide.batch_process_task.delay(
        [{"query": f"guide batch {i}", "max_new_tokens": 4} for i in range(2)]
    ).get(timeout=60)
    assert len(batch) == 2 and all(set(r) >= GUIDE_FIELDS for r in batch)


def test_celery_guide_fastapi_round_trip(celery_guide):
    client = TestClient(celery_guide.app)
    task_id = client.post("/api/process", json={"query": "guide api", "max_new_tokens": 4}).json()["task_id"]
    body = wait_until(
        lambda: (b := client.get(f"/api/task/{task_id}").json())["status"] != "processing" and b,
        60,
        0.1,
        "the guide's task",
    )
    assert body["status"] == "completed"
    assert set(body["result"]) >= GUIDE_FIELDS


def test_flask_guide():
    module = importlib.import_module("examples.flask_guide")
    client = module.app.test_client()
    response = client.post("/api/query", json={"query": "guide flask", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    assert set(response.get_json()) >= GUIDE_FIELDS
    assert client.get("/api/stats").get_json()["requests"] == 1
    module.cache_engine.shutdown()


def test_django_guide(django_settings):
    from django.test import Client

    response = Client().post(
        "/guide/process_query", {"query": "guide django", "max_new_tokens": 4}, "application/json"
    )
    assert response.status_code == 200, response.content
    assert set(response.json()) >= GUIDE_FIELDS
    assert Client().get("/guide/process_query").status_code == 405  # require_http_methods(["POST"])


async def test_django_guide_async(django_settings):
    from django.test import AsyncClient

    response = await AsyncClient().post(
        "/guide/process_query", {"query": "guide django async", "max_new_tokens": 4}, "application/json"
    )
    assert response.status_code == 200, response.content
    assert set(response.json()) >= GUIDE_FIELDS

"""Test-only Celery task with a real, deterministic failure mode, imported only by the test worker
(`bul worker --include tests.integrations.celery_test_tasks`).

`flaky_document_task` counts its attempts in Redis (key `counter_key` on the broker's database) and
raises `ConnectionError` on the first `failures` attempts; after that it runs exactly what
`process_document_task` runs, through the same retry policy (`run_with_retries`)."""

from __future__ import annotations

from typing import Any

import redis
from celery import Task

from bulk.integrations.celery.app import bul_tasks
from bulk.integrations.celery.settings import celery_settings
from bulk.integrations.celery.tasks import MAX_RETRIES, run_with_retries
from bulk.integrations.celery.worker_engine import get_engine


@bul_tasks.task(bind=True, max_retries=MAX_RETRIES, name="bul.tests.flaky_document")
def flaky_document_task(self: Task, query_data: Any, failures: int, counter_key: str) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with redis.Redis.from_url(celery_settings().broker_url) as client:
            attempt = client.incr(counter_key)
        if attempt <= failures:
            raise ConnectionError(f"simulated outage on attempt {attempt}")
        return get_engine().process_request_sync(query_data)

    return run_with_retries(self, work)

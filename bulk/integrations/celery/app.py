"""The Celery app `bul_tasks`. Run a worker with `bul worker` (or `celery -A bulk.integrations.celery.app
worker`); enqueue from anywhere that imports `bulk.integrations.celery.tasks`.

Messages and results are JSON only: a result backend that accepted pickle would run code stored by
whoever can write to Redis."""

from __future__ import annotations

from celery import Celery

from bulk.integrations.celery import worker_engine  # noqa: F401  (connects the engine's worker signals)
from bulk.integrations.celery.settings import celery_settings

_settings = celery_settings()

bul_tasks = Celery(
    "bul_tasks",
    broker=_settings.broker_url,
    backend=_settings.result_backend,
    include=["bulk.integrations.celery.tasks"],
)
bul_tasks.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    # Ack after the task ran, so a worker that dies mid-task (machine lost, SIGKILL) leaves the message
    # to be redelivered. A child killed by the OS (e.g. out of memory on one huge prompt) is not
    # requeued (task_reject_on_worker_lost stays off): that message would only kill the next one too.
    task_acks_late=True,
    # STARTED tells "running" from "queued" in the task status.
    task_track_started=True,
    result_expires=_settings.result_expires,
    worker_proc_alive_timeout=_settings.worker_alive_timeout,
    # One model per process runs one request at a time: do not hoard messages other workers could run.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

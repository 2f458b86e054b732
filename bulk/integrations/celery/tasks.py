"""The tasks: one document (`process_document_task`) or a batch (`batch_process_task`) through this
worker process's engine.

Failures split in two. Bad input (`InvalidRequestError`, bad configuration) fails at once as
`TaskInputError`: running it again gives the same answer. Anything else (a backend down, the model
thread gone) is retried up to `max_retries` times with exponential back-off and jitter, then fails with
the last error."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task

from bulk.engine.request import parse_request
from bulk.engine.result import GenerationResult
from bulk.errors import InvalidConfigError, InvalidRequestError
from bulk.integrations.celery.app import bul_tasks
from bulk.integrations.celery.settings import celery_settings
from bulk.integrations.celery.worker_engine import get_engine

if TYPE_CHECKING:
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

MAX_RETRIES = 3
T = TypeVar("T")


class TaskInputError(ValueError):
    """The task's input was rejected; not retried. Its args are (field, message) so that the JSON result
    backend can rebuild it on the client side."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def backoff_seconds(retries: int) -> float:
    """Delay before retry number `retries` (0-based): exponential, capped, with "equal jitter" (a random
    point in the upper half) so that tasks failing together do not come back together."""
    settings = celery_settings()
    ceiling = min(settings.retry_backoff * 2**retries, settings.retry_backoff_max)
    return random.uniform(ceiling / 2, ceiling)


def run_with_retries(task: Task, work: Callable[[], T]) -> T:
    """Run `work` for a bound task: input errors fail now, everything else goes through `task.retry`."""
    try:
        return work()
    except InvalidRequestError as exc:
        raise TaskInputError(exc.field, exc.message) from None
    except InvalidConfigError as exc:
        raise TaskInputError(exc.key, exc.message) from None
    except Exception as exc:
        # Past max_retries, retry() raises `exc` itself, so the task fails with the real error.
        raise task.retry(exc=exc, countdown=backoff_seconds(task.request.retries)) from exc


@bul_tasks.task(bind=True, max_retries=MAX_RETRIES, name="bul.process_document")
def process_document_task(self: Task, query_data: Any) -> GenerationResult:
    """One request dict (the guide's `{"query": ..., "priority": ...}`) -> the engine's result dict."""
    return run_with_retries(self, lambda: get_engine().process_request_sync(query_data))


@bul_tasks.task(bind=True, max_retries=MAX_RETRIES, name="bul.batch_process")
def batch_process_task(self: Task, queries: Any) -> list[GenerationResult]:
    """A list of request dicts -> one result per request, in order. Every request is checked before any
    runs: a bad one fails the whole batch at once, naming it (`queries[2].query`), so a batch is never
    half done because of its input."""
    if not isinstance(queries, list):
        raise TaskInputError("queries", f"must be a list of request objects, got {type(queries).__name__}")

    def work() -> list[GenerationResult]:
        engine = get_engine()
        for index, query in enumerate(queries):
            try:
                parse_request(query, engine.config)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"queries[{index}].{exc.field}", exc.message) from None
        return [_one(engine, index, query) for index, query in enumerate(queries)]

    return run_with_retries(self, work)


def _one(engine: UltraAdaptiveKVCacheEngine, index: int, query: Any) -> GenerationResult:
    try:
        return engine.process_request_sync(query)
    except InvalidRequestError as exc:  # e.g. too long for the context, known only once tokenized
        raise InvalidRequestError(f"queries[{index}].{exc.field}", exc.message) from None

"""FastAPI side of the Celery integration: `POST /api/process` enqueues a request for a `bul worker`
and answers `{"task_id"}`; `celery_task_status(id)` reads a task's state back. A server feature (it
answers with the server's error body and JSON route), so it lives here and imports the Celery app
(`bulk.integrations.celery`), never the other way round.

`router` carries only `POST /api/process`: `bul serve` (with `BUL_CELERY=1`) has its own
`GET /api/task/{id}` and falls back to `celery_task_status`. An app of your own can include
`task_status_router` too, which serves `GET /api/task/{id}` and `GET /api/task/{id}/status` from Celery.

Unknown ids: Celery reports any id it has no result for as PENDING, so a typo would look like a task
waiting forever. Every task published through `bul_tasks` therefore leaves a marker in the result backend
(expiring with the results); PENDING without a marker is "unknown" (None, a 404). With a result backend
that is not a key-value store there is no marker, and PENDING is reported as `processing`."""

from __future__ import annotations

from typing import Annotated, Any

from celery import signals, states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.result import AsyncResult
from fastapi import APIRouter, Body, HTTPException

from bulk.engine.request import parse_request
from bulk.errors import InvalidRequestError
from bulk.integrations.celery.app import bul_tasks
from bulk.integrations.celery.settings import engine_config
from bulk.integrations.celery.tasks import process_document_task
from bulk.server.errors import invalid_request_response
from bulk.server.json_input import JSONRoute

SENT_MARKER_PREFIX = "bul-task-sent-"
PROCESSING_STATES = frozenset({states.PENDING, states.RECEIVED, states.STARTED, states.RETRY})

router = APIRouter(tags=["tasks"], route_class=JSONRoute)
task_status_router = APIRouter(tags=["tasks"])


@router.post("/api/process", responses={422: {"description": "Bad input; the body names the field"}})
def process_document(
    query: Annotated[dict[str, Any], Body(examples=[{"query": "Hello", "priority": 1}])],
) -> Any:
    """Queue one request (the body of `POST /api/query`) for a Celery worker; poll `/api/task/{task_id}`."""
    # Checked here as well as in the worker, so bad input is a 422 now rather than a failed task later.
    try:
        parse_request(query, engine_config())
    except InvalidRequestError as exc:
        return invalid_request_response(exc)
    # A plain `def` route: FastAPI runs it in a thread, so the broker round trip does not block the loop.
    task = process_document_task.delay(query)
    return {"task_id": task.id}


def celery_task_status(task_id: str) -> dict[str, Any] | None:
    """`{"task_id", "status": "processing"|"completed"|"failed", "result"?, "error"?}`, or None when no
    such task was sent (see the module docstring). Blocking: call it from a worker thread."""
    result = AsyncResult(task_id, app=bul_tasks)
    state = result.state
    if state == states.PENDING and not _was_sent(task_id):
        return None
    if state == states.SUCCESS:
        return {"task_id": task_id, "status": "completed", "result": result.result}
    if state in PROCESSING_STATES:
        return {"task_id": task_id, "status": "processing"}
    # FAILURE or REVOKED: `result.result` is the rebuilt exception (TaskInputError for bad input).
    error = result.result
    return {"task_id": task_id, "status": "failed", "error": str(error) if error else state.lower()}


@task_status_router.get("/api/task/{task_id}")
def get_task(task_id: str) -> dict[str, Any]:
    """A Celery task's status: `processing`, `completed` (with `result`) or `failed` (with `error`)."""
    status = celery_task_status(task_id)
    if status is None:
        raise HTTPException(404, detail=f"unknown task {task_id!r}")
    return status


@task_status_router.get("/api/task/{task_id}/status")
def get_task_status(task_id: str) -> dict[str, Any]:
    """The same as `GET /api/task/{task_id}` (the path the guide's REST client calls)."""
    return get_task(task_id)


def _marker_key(task_id: str) -> str:
    return SENT_MARKER_PREFIX + task_id


def _was_sent(task_id: str) -> bool:
    backend = bul_tasks.backend
    if not isinstance(backend, BaseKeyValueStoreBackend):
        return True  # cannot tell: treat PENDING as queued
    return backend.get(_marker_key(task_id)) is not None


@signals.before_task_publish.connect
def _mark_sent(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Before publishing, so the marker exists before any worker can write the task's result.
    task_id = (headers or {}).get("id")
    if task_id and sender in bul_tasks.tasks and isinstance(bul_tasks.backend, BaseKeyValueStoreBackend):
        bul_tasks.backend.set(_marker_key(task_id), "1")

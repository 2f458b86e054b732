"""The integration guide's REST routes: query, batch, task status, stats and health.

`POST /api/query` is the hot path (answers from the response cache arrive here in well under a
millisecond), so it does the minimum: validate, check limits, await the engine, encode."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from bulk.errors import InvalidRequestError
from bulk.server.deps import Engine, Settings, State, Tasks
from bulk.server.errors import error_body
from bulk.server.schemas import BatchAccepted, QueryRequest, TaskStatus, check_limits
from bulk.server.tasks import RegistryFullError

router = APIRouter()
_perf = time.perf_counter


class FastJSONResponse(JSONResponse):
    """Compact JSON; engine results are plain JSON data, so no extra encoding pass is needed."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@router.post("/api/query", response_class=FastJSONResponse, tags=["queries"])
async def process_query(body: QueryRequest, state: State) -> Response:
    """Answer one query: `{"result", "cache_hit", "latency", "cached_tokens", ...}`."""
    started = _perf()
    result = await state.engine.process_request(body.to_engine(state.settings))
    response = FastJSONResponse(result)
    state.metrics.observe_e2e("rest", _perf() - started)
    return response


@router.post("/api/batch", response_model=BatchAccepted, tags=["queries"])
async def process_batch(
    queries: list[QueryRequest] = Body(..., description="Queries to run in the background."),  # noqa: B008
    *,
    engine: Engine,
    settings: Settings,
    tasks: Tasks,
) -> Any:
    """Start every query in the background; returns at once with one task id per query."""
    if not queries:
        raise InvalidRequestError("queries", "the batch is empty")
    if len(queries) > settings.max_batch_size:
        raise InvalidRequestError(
            "queries", f"at most {settings.max_batch_size} queries (BUL_MAX_BATCH_SIZE)"
        )
    payloads = []
    for index, query in enumerate(queries):
        payload = query.model_dump(exclude_none=True)
        check_limits(payload, settings, prefix=f"{index}.")
        if "query" not in payload and "text" not in payload:
            raise InvalidRequestError(f"{index}.query", "missing: each query needs a 'query' (or 'text')")
        payloads.append(payload)
    try:
        task_ids = tasks.submit(engine, payloads)
    except RegistryFullError as exc:
        return JSONResponse(error_body(429, str(exc)), status_code=429, headers={"Retry-After": "5"})
    return {"status": "processing", "count": len(task_ids), "task_ids": task_ids}


def _task_status(request_tasks: Any, settings: Any, task_id: str) -> dict[str, Any]:
    status = request_tasks.get(task_id)
    if status is None and settings.celery:
        from bulk.integrations.celery.router import celery_task_status

        status = celery_task_status(task_id)
    if status is None:
        raise HTTPException(404, detail=f"unknown task {task_id!r}")
    return status


@router.get(
    "/api/task/{task_id}", response_model=TaskStatus, response_model_exclude_none=True, tags=["tasks"]
)
async def get_task(task_id: str, tasks: Tasks, settings: Settings) -> Any:
    """A task's status: `processing`, `completed` (with `result`) or `failed` (with `error`)."""
    return _task_status(tasks, settings, task_id)


@router.get(
    "/api/task/{task_id}/status", response_model=TaskStatus, response_model_exclude_none=True, tags=["tasks"]
)
async def get_task_status(task_id: str, tasks: Tasks, settings: Settings) -> Any:
    """The same as `GET /api/task/{id}` (the path the guide's REST client calls)."""
    return _task_status(tasks, settings, task_id)


@router.get("/api/stats", tags=["monitoring"])
async def get_stats(engine: Engine) -> dict[str, Any]:
    """Engine statistics: hit rates, token hit rate, latency and TTFT percentiles, tiers, queue."""
    return engine.get_stats()


@router.get("/health", tags=["monitoring"], responses={503: {"description": "The model is loading"}})
async def health(request: Request, engine: Engine, settings: Settings) -> Response:
    """200 once the model is loaded and warm; 503 while it loads (or if loading failed)."""
    if engine.ready:
        return JSONResponse({"status": "ok", "model": settings.model_name})
    failure = request.app.state.warmup_error
    body = {"status": "error", "error": failure} if failure else {"status": "loading"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

"""The integration guide's REST routes: query, batch, task status, stats and health.

`POST /api/query` is the hot path (answers from the response cache take tens of microseconds), so
it does the minimum: read and validate the body in one pass, check limits, and send the JSON bytes
the engine hands back. See docs/server.md, "Throughput"."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from bulk.errors import InvalidRequestError
from bulk.server.deps import Engine, ServerState, Settings, Tasks
from bulk.server.disconnect import until_disconnected
from bulk.server.errors import error_body
from bulk.server.json_body import VALIDATION_ERROR_RESPONSE, json_body_openapi, parse_json_body, read_body
from bulk.server.json_input import JSONRoute
from bulk.server.schemas import BatchAccepted, QueryRequest, TaskStatus, check_limits
from bulk.server.settings import ServerSettings
from bulk.server.tasks import RegistryFullError, TaskRegistry

router = APIRouter(route_class=JSONRoute)  # deeply nested JSON is a 422, as any bad JSON
_perf = time.perf_counter


# `POST /api/query` is registered on the app itself (`add_query_route`), not on `router`: FastAPI
# matches an included router's routes through one more layer per request, measured at ~15 us.
QUERY_ROUTE: dict[str, Any] = {
    "methods": ["POST"],
    "tags": ["queries"],
    "response_model": None,
    "openapi_extra": json_body_openapi(QueryRequest),
    "responses": VALIDATION_ERROR_RESPONSE,
}


def add_query_route(app: FastAPI) -> None:
    app.add_api_route("/api/query", process_query, **QUERY_ROUTE)


async def process_query(request: Request) -> Response:
    """Answer one query: `{"result", "cache_hit", "latency", "cached_tokens", ...}`."""
    # The body is validated in one step (`parse_json_body`) rather than by FastAPI's body machinery,
    # with the same 422s, and an identical body seen recently is not validated again (`ParsedBodies`:
    # the response cache answers identical requests, so their checks are cached too). The engine
    # hands back the answer as JSON bytes, assembled from the stored JSON when it comes from the
    # response cache. The state the lifespan built is read from `app.state` directly: resolving it
    # through `Depends` (as every other route does) cost about 12 us a request.
    started = _perf()
    state: ServerState = request.app.state.bul
    body = await read_body(request)
    parsed = state.parsed_bodies.get(request, body)
    # A client gone before its answer cancels the generation (`until_disconnected`; free for an
    # answer from the response cache, which is ready at once).
    if parsed is not None:
        answer = await until_disconnected(request, state.engine.process_request_json(parsed.renewed()))
    else:
        payload = parse_json_body(request, body, QueryRequest).to_engine(state.settings)
        parsed = state.engine.parse(payload)  # the engine's checks (and stats of invalid requests)
        answer = await until_disconnected(request, state.engine.process_request_json(parsed))
        state.parsed_bodies.put(request, body, parsed)
    response = Response(answer, media_type="application/json")
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
    if len(queries) > settings.max_batch_queries:
        raise InvalidRequestError(
            "queries", f"at most {settings.max_batch_queries} queries (BUL_MAX_BATCH_QUERIES)"
        )
    payloads = []
    for index, query in enumerate(queries):
        payload = query.model_dump(exclude_none=True)
        check_limits(payload, settings, prefix=f"{index}.")
        if "query" not in payload and "text" not in payload:
            raise InvalidRequestError(f"{index}.query", "missing: each query needs a 'query' (or 'text')")
        try:
            # The engine's own checks now (max_new_tokens, temperature, ...): a bad query is this
            # request's 422 naming it, not a task that fails later.
            engine.parse(payload)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{index}.{exc.field}", exc.message) from None
        payloads.append(payload)
    try:
        task_ids = tasks.submit(engine, payloads)
    except RegistryFullError as exc:
        return JSONResponse(error_body(429, str(exc)), status_code=429, headers={"Retry-After": "5"})
    return {"status": "processing", "count": len(task_ids), "task_ids": task_ids}


async def _task_status(tasks: TaskRegistry, settings: ServerSettings, task_id: str) -> dict[str, Any]:
    status = tasks.get(task_id)
    if status is None and settings.celery:
        from bulk.server.celery_routes import celery_task_status

        # A blocking Redis round trip: run it on a worker thread, not on the event loop.
        status = await run_in_threadpool(celery_task_status, task_id)
    if status is None:
        raise HTTPException(404, detail=f"unknown task {task_id!r}")
    return status


@router.get(
    "/api/task/{task_id}", response_model=TaskStatus, response_model_exclude_none=True, tags=["tasks"]
)
async def get_task(task_id: str, tasks: Tasks, settings: Settings) -> Any:
    """A task's status: `processing`, `completed` (with `result`) or `failed` (with `error`)."""
    return await _task_status(tasks, settings, task_id)


@router.get(
    "/api/task/{task_id}/status", response_model=TaskStatus, response_model_exclude_none=True, tags=["tasks"]
)
async def get_task_status(task_id: str, tasks: Tasks, settings: Settings) -> Any:
    """The same as `GET /api/task/{id}` (the path the guide's REST client calls)."""
    return await _task_status(tasks, settings, task_id)


@router.get("/api/stats", tags=["monitoring"])
async def get_stats(engine: Engine) -> dict[str, Any]:
    """Engine statistics: hit rates, token hit rate, latency and TTFT percentiles, tiers, queue
    (through a cluster's ingress: the totals, and each replica's figures under `replicas`)."""
    return await engine.fetch_stats()


@router.get("/health", tags=["monitoring"], responses={503: {"description": "The model is loading"}})
async def health(request: Request, engine: Engine, settings: Settings) -> Response:
    """200 once the model is loaded and warm; 503 while it loads (or if loading failed)."""
    if engine.ready:
        return JSONResponse({"status": "ok", "model": settings.model_name})
    failure = request.app.state.warmup_error
    body = {"status": "error", "error": failure} if failure else {"status": "loading"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

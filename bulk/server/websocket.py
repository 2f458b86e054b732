"""WebSocket `/ws/query`: many queries per socket, answered in order.

In: `{"query": "..."}` (or the guide's `{"text": ..., "priority": 1}`), plus any engine parameter,
an optional `"stream": true` and an optional `"id"` echoed back. Out: `{"result", "cache_hit",
"latency", ...}`; when streaming, `{"token": "..."}` messages first and the result with `"done": true`.
A failed message is answered with the body an HTTP route would send for the same error
(`bulk.errors.error_body`: a 422 names the bad field, `{"detail": [...], "error": {"message", "type",
"param", "code"}}`; the engine unavailable is a 503, a bug a 500), plus the message's `"id"`; the socket
stays open."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from bulk.engine.protocol import ServingEngine
from bulk.engine.result import LOGPROBS_FIELD, RESULT_FIELDS
from bulk.errors import (
    BulError,
    InvalidRequestError,
    engine_error_body,
    invalid_request_body,
    unexpected_error_body,
)
from bulk.metrics import PrometheusExporter
from bulk.server.deps import Engine, Metrics, Settings
from bulk.server.json_input import loads
from bulk.server.schemas import check_limits
from bulk.server.settings import ServerSettings

log = logging.getLogger(__name__)
router = APIRouter()

# An answer's fields, without what an engine adds around them (a stream's `done`, a listener's `status`).
ANSWER_FIELDS = RESULT_FIELDS


@router.websocket("/ws/query")
async def websocket_query(websocket: WebSocket, engine: Engine, settings: Settings, metrics: Metrics) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None and message.get("bytes") is not None:
                raw = message["bytes"].decode("utf-8", errors="replace")
            await _answer(websocket, raw or "", engine, settings, metrics)
    except WebSocketDisconnect:
        return


async def _answer(
    websocket: WebSocket,
    raw: str,
    engine: ServingEngine,
    settings: ServerSettings,
    metrics: PrometheusExporter,
) -> None:
    started = time.perf_counter()
    echo: dict[str, Any] = {}
    try:
        data = _parse(raw)
        if "id" in data:
            echo["id"] = data.pop("id")
        stream = data.pop("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequestError("stream", "must be true or false")
        check_limits(data, settings)
        if stream:
            async for event in engine.stream_request(data):
                if event.get("done"):
                    await websocket.send_json({**echo, **_answer_fields(event), "done": True})
                else:
                    await websocket.send_json({**echo, **_token_fields(event)})
        else:
            result = await engine.process_request(data)
            await websocket.send_json({**echo, **_answer_fields(result)})
        metrics.observe_e2e("websocket", time.perf_counter() - started)
    except InvalidRequestError as exc:
        await websocket.send_json({**echo, **invalid_request_body(exc)})
    except BulError as exc:
        log.error("websocket query failed: %s", exc)
        await websocket.send_json({**echo, **engine_error_body(exc)})
    except WebSocketDisconnect:
        raise
    except Exception as exc:
        # A bug, not bad input: logged with its traceback, answered, and the socket stays usable.
        log.exception("websocket query failed unexpectedly")
        await websocket.send_json({**echo, **unexpected_error_body(exc)})


def _parse(raw: str) -> dict[str, Any]:
    """The message as a JSON object; anything else is an `InvalidRequestError` naming `message`."""
    try:
        data = loads(raw)  # bounded nesting: 50,000 `[` is bad JSON here, not a RecursionError
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("message", f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("message", 'must be a JSON object such as {"query": "..."}')
    return data


def _answer_fields(result: Mapping[str, Any]) -> dict[str, Any]:
    # `logprobs` is in an answer only when its request asked for them (`bulk.engine.result`).
    return {key: result[key] for key in (*ANSWER_FIELDS, LOGPROBS_FIELD) if key in result}


def _token_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    return {key: event[key] for key in ("token", LOGPROBS_FIELD) if key in event}

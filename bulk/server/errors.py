"""Error translation at the HTTP boundary: bad input is a 422 naming the field, never a 500.

Every error body is `bulk.errors.error_body`'s (FastAPI's `detail` list beside an OpenAI-style `error`
object), the same body the Flask and Django integrations send, and the WebSocket route sends as a
message (503 and 500 bodies from `bulk.errors.engine_error_body` and `unexpected_error_body`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from bulk.errors import (
    BulError,
    EngineClosedError,
    InvalidRequestError,
    ModelLoadError,
    engine_error_body,
    error_body,
    invalid_request_body,
    unexpected_error_body,
)
from bulk.server.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnectedError

__all__ = ["OPENAI_FIELDS", "error_body", "install_error_handlers", "invalid_request_response"]

log = logging.getLogger(__name__)

# Engine field names -> the names the OpenAI API uses for them.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "query": "prompt", "text": "prompt"}


def invalid_request_response(exc: InvalidRequestError, path: str = "") -> JSONResponse:
    field = OPENAI_FIELDS.get(exc.field, exc.field) if path.startswith("/v1/") else exc.field
    return JSONResponse(invalid_request_body(exc, field), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only loc/msg/type: `input` may be undecodable bytes and `ctx` may hold exception objects.
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type")),
            }
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        field = ".".join(p for p in first["loc"] if p != "body") or "body"
        if first.get("type") == "json_invalid":
            # FastAPI locates bad JSON at ("body", <offset>): the field is the body; say what is wrong.
            field, reason = "body", (exc.errors()[0].get("ctx") or {}).get("error")
            if isinstance(reason, str) and reason not in first["msg"]:
                first["msg"] = f"{first['msg']}: {reason}"
        return JSONResponse(error_body(422, f"{field}: {first['msg']}", field, errors), status_code=422)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return invalid_request_response(exc, request.url.path)

    @app.exception_handler(EngineClosedError)
    async def engine_closed(request: Request, exc: EngineClosedError) -> JSONResponse:
        return JSONResponse(engine_error_body(exc), status_code=503)

    @app.exception_handler(ModelLoadError)
    async def model_failed(request: Request, exc: ModelLoadError) -> JSONResponse:
        log.error("model load failed: %s", exc)
        return JSONResponse(engine_error_body(exc), status_code=503)

    @app.exception_handler(ClientDisconnectedError)
    async def client_gone(request: Request, exc: ClientDisconnectedError) -> Response:
        # Nobody reads it (the server drops it); the access log shows the request ended this way.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(BulError)
    async def other_engine_error(request: Request, exc: BulError) -> JSONResponse:
        log.error("engine error on %s: %s", request.url.path, exc)
        return JSONResponse(engine_error_body(exc), status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: answer in the same JSON shape so clients can show it.
        log.error("unexpected %s on %s: %s", type(exc).__name__, request.url.path, exc)
        return JSONResponse(unexpected_error_body(exc), status_code=500)

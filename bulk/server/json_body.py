"""Reading a JSON request body into a pydantic model in one step, with FastAPI's own 422s.

FastAPI's body parameters decode the JSON into Python objects, then validate those objects; on a
route answering in microseconds that is a large share of the time. `parse_json_body` hands the raw
bytes (read by `read_body`) to pydantic's `model_validate_json` (one pass, in Rust) and raises the same
`RequestValidationError` (locations under `"body"`) that FastAPI would, so the error handlers give
the same 422. `json_body_openapi` documents the body in the OpenAPI schema as FastAPI would."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

Model = TypeVar("Model", bound=BaseModel)

VALIDATION_ERROR_RESPONSE: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
}


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads `model` with `parse_json_body`: the same reference
    to `#/components/schemas/<Model>` that FastAPI writes for a body parameter. The component is
    there when another route takes `model` as a FastAPI body (`/api/batch` does for QueryRequest;
    tests/server/test_query_route.py checks that the reference resolves)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def parse_json_body(request: Request, body: bytes, model: type[Model]) -> Model:
    """Validate `body` (already read) as `model`; FastAPI's 422 on a missing, non-JSON or invalid body."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    content_type = _header(request, b"content-type")
    if content_type and content_type != b"application/json" and not _is_json(content_type.decode("latin-1")):
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "the body must be JSON (Content-Type: application/json)",
                }
            ]
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


class ParsedBodies:
    """Parsed engine requests of recently seen request bodies, so an identical body (what the
    response cache answers) is validated once, not on every request (each use gets a fresh request
    id: `GenerationRequest.renewed`). Only small bodies sent as plain
    `application/json` are kept; a body is keyed by its exact bytes, so anything that differs is
    validated afresh. Bounded; the oldest entry leaves first."""

    MAX_BODY = 4096

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._entries: dict[bytes, Any] = {}

    def get(self, request: Request, body: bytes) -> Any | None:
        if _header(request, b"content-type") != b"application/json":
            return None
        return self._entries.get(body)

    def put(self, request: Request, body: bytes, parsed: Any) -> None:
        if len(body) > self.MAX_BODY or _header(request, b"content-type") != b"application/json":
            return
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[body] = parsed


async def read_body(request: Request) -> bytes:
    """The whole body, straight from `receive` (`Request.body()` goes through an async generator,
    a measurable share of a cached answer). The body size limit applies: see `body_limit.py`."""
    message = await request.receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(request: Request, name: bytes) -> bytes | None:
    for key, value in request.scope["headers"]:
        if key == name:
            return value
    return None


def _is_json(content_type: str) -> bool:
    """FastAPI's rule: `application/json` or any `application/*+json`, parameters ignored."""
    kind = content_type.partition(";")[0].strip().lower()
    return kind.startswith("application/") and (kind == "application/json" or kind.endswith("+json"))

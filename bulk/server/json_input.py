"""Parsing untrusted JSON, on every route and on the WebSocket, with one parser and one failure mode.

Python's `json` module recurses once per nesting level: a message of 50,000 `[` raises
`RecursionError`, which FastAPI answers with a bare 400 and which dropped WebSocket connections.
pydantic's parser (the one `POST /api/query` validates with, in Rust) refuses nesting deeper than
its limit (about 200 levels) as invalid JSON, like any other malformed input: `loads` raises
`json.JSONDecodeError` for all of them, so FastAPI answers its usual 422 and the WebSocket its usual
error message. Our APIs never nest more than four levels, so nothing valid is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute


def loads(data: str | bytes) -> Any:
    """JSON text (str or UTF-8 bytes) to Python objects; any defect, nesting too deep or a number
    out of range included, raises `json.JSONDecodeError`, never `RecursionError`."""
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        document = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
        raise json.JSONDecodeError(str(exc), document, 0) from None


class _JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON body is read with `loads` (FastAPI's documented custom-route hook): set as
    `route_class` on every router that takes a JSON body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_JSONRequest(request.scope, request.receive))

        return route

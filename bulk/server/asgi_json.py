"""JSON answers sent straight through ASGI, for the pure-ASGI middlewares (no Response object, no
extra task on the hot path)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import Send

from bulk.errors import error_body

Headers = Iterable[tuple[bytes, bytes]]


async def send_json(send: Send, status: int, body: bytes, headers: Headers = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, headers: Headers = ()) -> None:
    """The same error body as every route's (`bulk.errors.error_body`)."""
    await send_json(send, status, json.dumps(error_body(status, message)).encode(), headers)

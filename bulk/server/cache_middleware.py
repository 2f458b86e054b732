"""The integration guide's `CacheMiddleware` (optional, `BUL_CACHE_MIDDLEWARE=true`).

Whole HTTP answers are kept in the engine's response cache (`engine.store_in_cache`), keyed by method,
path and a SHA-256 of the body, so two different queries to one path never share an answer (the
guide's key had no body). Only 200 JSON answers are stored; `/health`, `/metrics`, stats, task status
and streams are never cached. A cached answer carries `X-BUL-Cache: hit`; it is the stored bytes, so
its `latency` is the first request's.

It is written as pure ASGI rather than the guide's `BaseHTTPMiddleware`, which runs every request in
an extra task and cannot pass streaming answers through untouched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bulk.engine.protocol import ServingEngine
from bulk.server.asgi_json import send_error, send_json
from bulk.server.body_limit import too_large_message

CACHED_PATHS = ("/api/query", "/v1/completions", "/v1/chat/completions")
_HIT, _MISS = [(b"x-bul-cache", b"hit")], [(b"x-bul-cache", b"miss")]


class CacheMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        get_engine: Callable[[], ServingEngine],
        ttl: float,
        max_body_bytes: int,
        paths: tuple[str, ...] = CACHED_PATHS,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.too_large = too_large_message(max_body_bytes)
        self.get_engine = get_engine  # the engine exists only once the lifespan has built it
        self.ttl = ttl
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            # The body limit's own answer (`body_limit.py`), for a body it let through undeclared.
            await send_error(send, 413, self.too_large, _MISS)
            return
        engine = self.get_engine()
        key = f"http:{scope['method']}:{scope['path']}:{hashlib.sha256(body).hexdigest()}"
        cached = await engine.get_from_cache(key)
        if isinstance(cached, bytes | bytearray):
            await send_json(send, 200, bytes(cached), _HIT)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}  # the whole body, read
            return await receive()

        status = 0
        is_json = False
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status, is_json
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
            elif message["type"] == "http.response.body" and status == 200 and is_json:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await engine.store_in_cache(key, b"".join(chunks), ttl=self.ttl)
            await send(message)

        await self.app(scope, replay, capture)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past `limit` bytes (it is read here, before FastAPI's own
    limit could apply)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(parts)

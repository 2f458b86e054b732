"""API keys and rate limits, as one pure ASGI middleware (no per-request task or body copy).

- Keys: off when `BUL_API_KEYS` is empty. Otherwise every request except `/health` and `/metrics`
  needs `Authorization: Bearer <key>` (WebSockets may pass `?api_key=` instead, since browsers
  cannot set headers on them); a missing or wrong key is a 401.
- Rate limit: a token bucket per key (per client address without keys): `rate_limit_burst`
  requests at once, refilled at `rate_limit_per_minute`. Over it: 429 with `Retry-After`.
- With keys on, requests without a valid key have a bucket per client address of their own
  (`unauthenticated_*`): a flood of them gets 429 with `Retry-After`, like any other, instead of an
  endless stream of 401s. It is consulted only once a key has failed, so a valid key is never
  refused because another client behind the same address (a proxy, a NAT) floods.
The request body size limit is `body_limit.py`'s (413)."""

from __future__ import annotations

import hmac
import math
import time
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from bulk.server.asgi_json import send_error

OPEN_PATHS = frozenset({"/health", "/metrics"})
MAX_BUCKETS = 100_000  # client addresses remembered; the oldest are dropped beyond it


class TokenBuckets:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            if key not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
                self._buckets.pop(next(iter(self._buckets)))
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class ProtectionMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: list[str],
        rate_limit_per_minute: int,
        rate_limit_burst: int,
        unauthenticated_per_minute: int = 0,
        unauthenticated_burst: int = 20,
    ):
        self.app = app
        self.keys = [key.encode() for key in api_keys]
        self.buckets = (
            TokenBuckets(rate_limit_per_minute, rate_limit_burst) if rate_limit_per_minute else None
        )
        self.refusals = (
            TokenBuckets(unauthenticated_per_minute, unauthenticated_burst)
            if api_keys and unauthenticated_per_minute
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        identity: str | None = None
        if self.keys:
            key = _presented_key(scope)
            if key is None or not any(hmac.compare_digest(key, k) for k in self.keys):
                wait = self.refusals.take(_address(scope)) if self.refusals is not None else 0.0
                if wait > 0:
                    await _refuse(
                        scope,
                        receive,
                        send,
                        429,
                        "too many requests without a valid API key",
                        _retry_after(wait),
                    )
                    return
                await _refuse(
                    scope,
                    receive,
                    send,
                    401,
                    "a valid API key is required (Authorization: Bearer <key>)",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            identity = "key:" + key.decode(errors="replace")
        if self.buckets is not None:
            wait = self.buckets.take(identity or _address(scope))
            if wait > 0:
                await _refuse(
                    scope, receive, send, 429, "rate limit exceeded; retry later", _retry_after(wait)
                )
                return
        await self.app(scope, receive, send)


def _address(scope: Scope) -> str:
    # The peer's address as the server sees it: behind a proxy, run uvicorn with --proxy-headers
    # and --forwarded-allow-ips so that this is the client's, not the proxy's.
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def _retry_after(wait: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(max(1, math.ceil(wait))).encode())]


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    if scope["type"] == "websocket":
        values = parse_qs(scope.get("query_string", b"").decode(errors="replace")).get("api_key")
        return values[0].encode() if values else None
    return None


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting answers the handshake with a 403.
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": message[:100]})
        return
    await send_error(send, status, message, headers)

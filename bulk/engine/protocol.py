"""`ServingEngine`: the one interface the API's routes talk to.

The routes (`bulk.server`) never name an implementation. Two exist:

- `UltraAdaptiveKVCacheEngine` (`bulk.engine.engine`), the engine in this process (`bul serve`);
- `RayEngineClient` (`bulk.cluster.app`), a thin client of a cluster's engine replicas
  reached through a Ray Serve `DeploymentHandle` (`bul cluster`).

So no route is written twice: whatever the routes need is a method here, and both keep its meaning.
Bad input raises `InvalidRequestError` from `parse` (or from the `process_*` and `stream_request`
methods, which parse a dict themselves), on either side of a process boundary alike."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from bulk.config import KVCacheConfig
from bulk.engine.request import GenerationRequest
from bulk.engine.result import GenerationResult


@runtime_checkable
class ServingEngine(Protocol):
    """What the API routes use of an engine. Every request argument (`query`) is a request dict
    (`{"query": ...}`, `{"messages": ...}`) or a `GenerationRequest` from `parse`."""

    config: KVCacheConfig

    @property
    def ready(self) -> bool:
        """True once a model is loaded and warm (a cluster: once a replica is)."""
        ...

    def parse(self, query: Any) -> GenerationRequest:
        """Check a request dict once; `InvalidRequestError` names a bad field."""
        ...

    async def process_request(self, query: Any) -> GenerationResult:
        """The answer as a dict: `result`, `cache_hit`, `cached_tokens`, `latency`, ..."""
        ...

    async def process_request_json(self, query: Any) -> bytes:
        """The same answer as compact UTF-8 JSON (the hot path of `POST /api/query`)."""
        ...

    def stream_request(self, query: Any) -> AsyncGenerator[dict[str, Any], None]:
        """`{"token": text}` events as they come, then the result with `"done": True`; closing the
        iterator early cancels the generation."""
        ...

    async def warmup(self) -> None:
        """Load the model (a cluster: wait for a replica); idempotent."""
        ...

    def get_stats(self) -> dict[str, Any]:
        """The latest figures (a cluster: those of the last `fetch_stats`)."""
        ...

    async def fetch_stats(self) -> dict[str, Any]:
        """The figures now: the local engine's at once, a cluster's from every replica (with a
        `replicas` entry per replica beside the totals)."""
        ...

    async def get_from_cache(self, key: str) -> Any | None:
        """The guide's key-value cache (what `CacheMiddleware` keeps answers in)."""
        ...

    async def store_in_cache(self, key: str, value: Any, ttl: float | None = None) -> None: ...

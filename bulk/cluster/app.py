"""BUL on Ray Serve: one application of two deployments (see docs/cluster.md).

- `BULEngine`: N replicas, each one `UltraAdaptiveKVCacheEngine` built from the same `BUL_*` settings
  (Redis and PostgreSQL tiers shared by all), routed by `bulk.cluster.router`'s prefix-aware
  router. Each answers with plain data: a result, or an error as its class name, field and message
  (`bulk.errors.error_data`); and reports the blocks its memory tier holds to the routers.
- `BULIngress`: BUL's own FastAPI app (`bulk.server.app.create_app`: every route, `/metrics`,
  `/health`, the WebSocket), without a model: its engine is `RayEngineClient`, the `ServingEngine`
  over a `DeploymentHandle` of `BULEngine`, streaming through the handle.

Wiring only: the routes, the engine and the routing policy live elsewhere. A replica that dies under a
request costs the caller nothing: the client sends the request again (a stream too, when nothing was
delivered yet or the request is deterministic, skipping what was delivered), and Serve replaces the
replica. Ray moves these messages between its processes with pickle: the Ray cluster is a trusted
boundary (its ports are never exposed); what BUL stores in Redis and PostgreSQL stays pickle-free and
signed.

`bul cluster` deploys the application (`bulk.cluster.cli`); a Serve config file does the same
through `build_app` (`deploy/ray/serve-config.yaml`)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from bulk.cluster.router import TARGET_KWARG
from bulk.cluster.settings import ClusterSettings
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import GenerationRequest, parse_request
from bulk.engine.response_cache import ResponseCache
from bulk.engine.result import LOGPROBS_FIELD, GenerationResult
from bulk.engine_settings import EngineSettings
from bulk.errors import BulError, InvalidRequestError, error_data, error_from_data
from bulk.routing.chains import pack_block_ids
from bulk.routing.cluster_stats import merge_stats
from bulk.routing.registry import find_router

log = logging.getLogger(__name__)

APP_NAME = "bul"
ENGINE_DEPLOYMENT = "BULEngine"
INGRESS_DEPLOYMENT = "BULIngress"
ROUTERS = {
    "prefix": "bulk.cluster.router.PrefixAwareRouter",
    "pow2": "bulk.cluster.router.PowerOfTwoRouter",
}


# ---- the engine replica ---------------------------------------------------------------------------


def _with_replica(answer: bytes, replica: str) -> bytes:
    """A JSON object answer with `"replica": <id>` added, without decoding it."""
    return answer[:-1] + b',"replica":' + json.dumps(replica).encode() + b"}"


class EngineReplica:
    """One engine, answering with plain data. Methods take `bul_replica` (ignored here): the router
    reads it to send a request to one replica."""

    async def __init__(self, report_blocks: int = 65_536) -> None:  # type: ignore[misc]  # Serve awaits it
        self.engine = UltraAdaptiveKVCacheEngine(EngineSettings().engine_config())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._report_blocks = report_blocks
        # Ready before Serve sends anything: the model is loaded and warm when the replica is RUNNING.
        await self.engine.warmup()
        log.info("engine replica %s is ready (model %s)", self.replica_id, self.engine.config.model)

    def _failure(self, exc: Exception) -> dict[str, Any]:
        if not isinstance(exc, BulError):
            log.exception("replica %s: unexpected error", self.replica_id, exc_info=exc)
        return {"error": error_data(exc)}

    async def process_request(self, payload: Any, bul_replica: str | None = None) -> dict[str, Any]:
        try:
            result = await self.engine.process_request(payload)
        except Exception as exc:
            return self._failure(exc)
        return {"result": {**result, "replica": self.replica_id}}

    async def process_request_json(
        self, payload: Any, bul_replica: str | None = None
    ) -> bytes | dict[str, Any]:
        try:
            answer = await self.engine.process_request_json(payload)
        except Exception as exc:
            return self._failure(exc)
        return _with_replica(answer, self.replica_id)

    async def stream_request(
        self, payload: Any, bul_replica: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in self.engine.stream_request(payload):
                yield {**event, "replica": self.replica_id} if event.get("done") else event
        except Exception as exc:
            yield self._failure(exc)

    async def warmup(self, bul_replica: str | None = None) -> str:
        await self.engine.warmup()
        return self.replica_id

    async def get_stats(self, bul_replica: str | None = None) -> dict[str, Any]:
        return {"replica": self.replica_id, "stats": self.engine.get_stats()}

    def record_routing_stats(self) -> dict[str, Any]:
        """Pulled by Serve's controller every `stats_period_s` and handed to every router."""
        cached = self.engine.cached_blocks(self._report_blocks)
        return {
            "time": time.time(),
            "namespace": cached["namespace"],
            "block_size": cached["block_size"],
            "capacity_blocks": cached["capacity_blocks"],
            "blocks": pack_block_ids(cached["digests"]),
        }

    def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("the engine is not ready")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---- the client the ingress's routes use --------------------------------------------------------------


class EngineUnavailableError(BulError):
    """No engine replica answered (each died under the request, `retries` times): a 503."""


class RayEngineClient:
    """`ServingEngine` over a `DeploymentHandle` of the engine deployment. Requests are checked here
    (the same `parse_request`, the same configuration: bad input is refused before any replica
    sees it) and sent as plain request dicts; answers and errors come back as data."""

    def __init__(
        self,
        handle: DeploymentHandle,
        config: KVCacheConfig,
        *,
        app_name: str = APP_NAME,
        retries: int = 4,
        stats_timeout_s: float = 10.0,
    ) -> None:
        self.config = config
        self._handle = handle
        self._streams = handle.options(stream=True)
        self._app_name = app_name
        self._retries = retries
        self._stats_timeout_s = stats_timeout_s
        self._ready = False
        self._invalid = 0
        self._stats: dict[str, Any] = {}
        # The guide's key-value cache (`CacheMiddleware`): this ingress's own memory.
        self._kv = ResponseCache(config.response_cache_size, config.response_cache_ttl)

    @property
    def ready(self) -> bool:
        return self._ready

    async def warmup(self) -> None:
        await self._call("warmup", None)
        self._ready = True

    def parse(self, query: Any) -> GenerationRequest:
        try:
            return parse_request(query, self.config)
        except InvalidRequestError:
            self._invalid += 1
            raise

    async def process_request(self, query: Any) -> GenerationResult:
        reply = await self._call("process_request", self.parse(query).to_payload())
        return reply["result"]

    async def process_request_json(self, query: Any) -> bytes:
        return await self._call("process_request_json", self.parse(query).to_payload())

    async def stream_request(self, query: Any) -> AsyncGenerator[dict[str, Any], None]:
        """The replica's events. When the replica dies mid-stream, the request goes again to
        another: at once if nothing was delivered yet; if something was, only for a deterministic
        request (greedy or seeded), whose text then starts with what was delivered, which is skipped."""
        request = self.parse(query)
        payload = request.to_payload()
        delivered = ""
        # A request asking for logprobs: the entries delivered so far, skipped in a retry as its text is.
        delivered_entries = 0
        for attempt in range(self._retries + 1):
            stream = _remote(self._streams.stream_request, payload)
            finished = False
            produced = ""
            produced_entries: list[Any] = []
            try:
                async for event in stream:
                    if "error" in event:
                        finished = True
                        raise error_from_data(event["error"])
                    if event.get("done"):
                        finished = True
                        yield event
                        return
                    produced += event["token"]
                    produced_entries.extend(event.get(LOGPROBS_FIELD) or ())
                    if len(produced) <= len(delivered):
                        if not delivered.startswith(produced):
                            raise EngineUnavailableError("a replica died mid-stream; the retry diverged")
                        continue
                    if not produced.startswith(delivered):
                        raise EngineUnavailableError("a replica died mid-stream; the retry diverged")
                    delta, delivered = produced[len(delivered) :], produced
                    out: dict[str, Any] = {"token": delta}
                    if LOGPROBS_FIELD in event:
                        out[LOGPROBS_FIELD] = produced_entries[delivered_entries:]
                        delivered_entries = len(produced_entries)
                    yield out
                finished = True
                return
            except RayActorError as exc:
                finished = True
                if attempt == self._retries or (delivered and not request.params.deterministic):
                    raise EngineUnavailableError(f"the engine replica died: {type(exc).__name__}") from None
                log.warning("an engine replica died mid-stream (%s); sending the request again", exc)
                await asyncio.sleep(_backoff(attempt))
            finally:
                if not finished:
                    stream.cancel()  # the caller went away: stop the generation on the replica

    async def _call(self, method: str, payload: Any) -> Any:
        for attempt in range(self._retries + 1):
            args = () if payload is None else (payload,)
            response = _remote(getattr(self._handle, method), *args)
            try:
                reply = await response
            except asyncio.CancelledError:
                response.cancel()  # the caller went away: stop the generation on the replica
                raise
            except RayActorError as exc:
                if attempt == self._retries:
                    raise EngineUnavailableError(f"the engine replica died: {type(exc).__name__}") from None
                log.warning("an engine replica died under a request (%s); sending it again", exc)
                await asyncio.sleep(_backoff(attempt))
                continue
            if isinstance(reply, dict) and "error" in reply:
                raise error_from_data(reply["error"])
            return reply
        raise AssertionError("unreachable")

    # ---- stats ----------------------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        return self._stats

    async def fetch_stats(self) -> dict[str, Any]:
        """Every replica's figures, asked of each (the router sends a request naming a replica to
        that replica), merged into the cluster view (`bulk.routing.cluster_stats`)."""
        router = find_router(self._app_name, self._handle.deployment_name)
        if router is None:  # no request went through this handle yet: its router does not exist
            await self.warmup()
            router = find_router(self._app_name, self._handle.deployment_name)
        wanted = router.replica_ids() if router is not None else []
        per_replica: dict[str, dict[str, Any]] = {}
        for _ in range(2):  # a second pass for replicas a FIFO router answered with another
            missing = [r for r in wanted if r not in per_replica]
            if not missing:
                break
            replies = await asyncio.gather(*(self._replica_stats(r) for r in missing), return_exceptions=True)
            for reply in replies:
                if isinstance(reply, dict):
                    per_replica[reply["replica"]] = reply["stats"]
        snapshot = router.routing_snapshot() if router is not None else None
        stats = merge_stats(per_replica, snapshot, ingress_invalid=self._invalid)
        stats["cluster"] = {
            "replicas": len(per_replica),
            "unreachable": sorted(set(wanted) - set(per_replica)),
            "policy": (snapshot or {}).get("policy"),
        }
        stats["ready"] = stats["ready"] or self._ready
        self._stats = stats
        return stats

    async def _replica_stats(self, replica: str) -> dict[str, Any]:
        response = _remote(self._handle.get_stats, **{TARGET_KWARG: replica})
        try:
            return await asyncio.wait_for(_awaited(response), self._stats_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            response.cancel()
            raise

    # ---- the guide's key-value cache ---------------------------------------------------------------

    async def get_from_cache(self, key: str) -> Any | None:
        return self._kv.get("user:" + key)

    async def store_in_cache(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._kv.put("user:" + key, value, ttl)


async def _awaited(response: Any) -> Any:
    return await response


def _remote(method: Any, *args: Any, **kwargs: Any) -> Any:
    """`method.remote(...)` as a request of its own. Within an HTTP request, Serve gives every handle
    call the HTTP request's internal id, so calls made side by side (a batch's queries, the stats of
    every replica) would share one, and a router matching replicas to requests by that id would
    mix them up; in a fresh context each call gets its own."""
    return contextvars.Context().run(method.remote, *args, **kwargs)


def _backoff(attempt: int) -> float:
    return min(0.1 * 2**attempt, 2.0)


# ---- the ingress --------------------------------------------------------------------------------------


class BULIngress:
    """BUL's FastAPI app over `RayEngineClient` (wrapped by `serve.ingress` in `bul_application`)."""

    def __init__(self, engine: DeploymentHandle, retries: int = 4) -> None:
        from bulk.server.settings import ServerSettings

        self._settings = ServerSettings()
        app_name = serve.get_replica_context().app_name
        self.client = RayEngineClient(
            engine, self._settings.engine_config(), app_name=app_name, retries=retries
        )

    def __serve_build_asgi_app__(self) -> Any:
        from bulk.server.app import create_app

        return create_app(self._settings, engine=self.client)


def bul_application(cluster: ClusterSettings | None = None, env: dict[str, str] | None = None) -> Any:
    """The Serve application: the ingress bound to the engine deployment. `env`: variables every
    replica gets (`bul cluster` passes its own `BUL_*`); a Serve config sets them in its runtime_env."""
    cluster = cluster if cluster is not None else ClusterSettings()
    runtime = {"runtime_env": {"env_vars": dict(env)}} if env else {}
    kwargs: dict[str, Any] = {}
    if cluster.router == "prefix":
        kwargs = {
            "imbalance_threshold": cluster.imbalance_threshold,
            "min_match_ratio": cluster.min_match_ratio,
        }
    # Replicas spread over nodes: a node lost takes at most this many with it.
    placement: dict[str, Any] = (
        {"max_replicas_per_node": cluster.max_replicas_per_node} if cluster.max_replicas_per_node else {}
    )
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests,
        ray_actor_options={"num_cpus": cluster.replica_cpus, **runtime},
        # Ray's pydantic model types its fields loosely; these are the values its docs give.
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTERS[cluster.router],  # type: ignore[arg-type]
            request_router_kwargs=kwargs,
            request_routing_stats_period_s=cluster.stats_period_s,  # type: ignore[arg-type]
        ),
        health_check_period_s=2.0,
        **placement,
    )
    ingress = serve.deployment(
        serve.ingress()(BULIngress),
        name=INGRESS_DEPLOYMENT,
        num_replicas=cluster.ingress_replicas,
        max_ongoing_requests=cluster.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, **runtime},
    )
    # `serve.deployment(cls, ...)` returns a Deployment; its overloads are typed for the decorator form.
    return ingress.bind(engine.bind(cluster.report_blocks), cluster.retries)  # type: ignore[attr-defined]


def build_app(args: dict[str, Any]) -> Any:
    """The Serve config's entry point (`import_path: bulk.cluster.app:build_app`); `args`
    are `ClusterSettings` fields (`replicas`, `router`, ...), over the `BUL_RAY_*` variables."""
    return bul_application(ClusterSettings(**(args or {})))

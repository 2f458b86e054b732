"""`UltraAdaptiveKVCacheEngine`: requests in, answers out, with every reusable KV block reused.

A request goes: parse and check (caller's thread) -> response cache (caller's thread, no queue) ->
priority queue -> model worker: tokenize, take the longest cached prefix, prefill the rest, decode,
store the new full blocks. The model is loaded lazily on the worker, so building an engine at import
time (as the guide's examples do) is free, and `warmup()` only makes the first request fast."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from bulk.config import KVCacheConfig
from bulk.engine.generate import OnStep, generate
from bulk.engine.request import GenerationRequest, parse_request
from bulk.engine.response_cache import ResponseCache, StoredAnswer, json_bytes, request_key
from bulk.engine.scheduler import PriorityWorker
from bulk.engine.stats import EngineStats, Listeners, config_summary
from bulk.errors import InvalidRequestError
from bulk.generation.decode import Step
from bulk.kv.prefix_cache import PrefixCache
from bulk.models import hf_cache
from bulk.models.loader import LoadedModel, load_model
from bulk.storage.factory import build_lower_tiers

log = logging.getLogger(__name__)

WARMUP_PRIORITY = 2**31  # ahead of any request


class UltraAdaptiveKVCacheEngine:
    def __init__(
        self,
        config: KVCacheConfig | None = None,
        *,
        model: LoadedModel | None = None,
        worker: PriorityWorker | None = None,
    ) -> None:
        """`model`: an already loaded model to share (tests, benchmarks comparing configurations); by
        default the engine loads `config.model` itself on first use. `worker`: a model thread to
        share; engines sharing a model should share it, since one model runs one request at a time.
        An engine shuts down only a worker it created."""
        self.config = config if config is not None else KVCacheConfig()
        self._owns_worker = worker is None
        self._worker = worker if worker is not None else PriorityWorker()
        self._model: LoadedModel | None = None
        self._prefix: PrefixCache | None = None
        self._arena: hf_cache.KVArena | None = None
        if model is not None:
            self._adopt(model)
        self._responses = ResponseCache(self.config.response_cache_size, self.config.response_cache_ttl)
        self._stats = EngineStats()
        self._warm = threading.Event()
        self._listeners = Listeners()

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the model is loaded and has served one request."""
        return self._warm.is_set()

    @property
    def model(self) -> LoadedModel:
        """The loaded model (loads it on the calling thread if needed)."""
        return self._load()

    async def warmup(self) -> None:
        """Load the model and run one request; idempotent."""
        await asyncio.wrap_future(self._worker.submit(self._warmup_job, WARMUP_PRIORITY))

    def warmup_sync(self) -> None:
        self._worker.submit(self._warmup_job, WARMUP_PRIORITY).result()

    def shutdown(self) -> None:
        """Fail queued requests, finish the running one, stop the worker (if this engine created it).
        Safe to call twice."""
        if self._owns_worker:
            self._worker.shutdown(wait=True)
        if self._prefix is not None:
            self._prefix.close()  # finishes queued writes to the lower tiers

    def drop_memory_tier(self) -> None:
        """Drop the memory tier's unpinned blocks; disk, Redis and PostgreSQL keep theirs, and the
        next requests promote what they need back (to free memory, or to measure the lower tiers)."""
        if self._prefix is not None:
            self._prefix.clear(lower_tiers=False)

    def flush_storage(self, timeout: float | None = None) -> bool:
        """Wait until every block queued for the lower tiers (disk, Redis, PostgreSQL) is written;
        True when done within `timeout` seconds. Serving never needs this; a handover does."""
        return self._prefix.flush(timeout) if self._prefix is not None else True

    def __enter__(self) -> UltraAdaptiveKVCacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------

    async def process_request(self, query: Any) -> dict[str, Any]:
        answer = self._answer_or_submit(query)
        return answer if isinstance(answer, dict) else await asyncio.wrap_future(answer)

    def process_request_sync(self, query: Any) -> dict[str, Any]:
        answer = self._answer_or_submit(query)
        return answer if isinstance(answer, dict) else answer.result()

    async def process_request_json(self, query: Any) -> bytes:
        """`process_request`'s answer as compact UTF-8 JSON, for HTTP layers: same fields, stats and
        listener events. An answer from the response cache is assembled from the stored JSON text
        instead of being decoded and encoded again per request."""
        started = time.perf_counter()
        request = self._parse(query)
        hit = self._cached_answer(request, started)
        if hit is not None:
            stored, latency = hit
            return stored.answer_json(latency, request.request_id)
        future = self._worker.submit(lambda: self._run(request, started), request.priority)
        return json_bytes(await asyncio.wrap_future(future))

    async def stream_request(self, query: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield `{"token": text}` as tokens come, then the full result with `"done": True`.
        Stopping the iteration early cancels the generation."""
        started = time.perf_counter()
        request = self._parse(query)
        cached = self._cached_response(request, started)
        if cached is not None:
            yield {"token": cached["result"]}
            yield {**cached, "done": True}
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Step] = asyncio.Queue()
        cancelled = threading.Event()
        future = self._worker.submit(
            lambda: self._run(
                request, started, lambda s: loop.call_soon_threadsafe(events.put_nowait, s), cancelled
            ),
            request.priority,
        )
        done = asyncio.wrap_future(future)
        try:
            while not done.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    if getter.result().text:
                        yield {"token": getter.result().text}
                else:
                    getter.cancel()
            yield {**done.result(), "done": True}
        finally:
            cancelled.set()
            done.cancel()

    # ---- the guide's key-value API (response cache) ------------------------------------------

    async def get_from_cache(self, key: str) -> Any | None:
        return self._responses.get("user:" + key)

    async def store_in_cache(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._responses.put("user:" + key, value, ttl)

    # ---- stats -----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call `listener(event)` when a request ends: its result dict with `"status": "ok"`, or
        `{"status": "error", "error": <class name>, "invalid": bool}`. Metrics exporters hook in here
        so the engine knows nothing of them. It runs on the thread that ended the request, so it
        must be quick; its exceptions are logged and dropped."""
        self._listeners.append(listener)

    def get_stats(self) -> dict[str, Any]:
        tiers = self._prefix.stats() if self._prefix is not None else {"memory": {}}
        return {
            **self._stats.snapshot(),
            "model": self.config.model,
            "ready": self.ready,
            "queue_depth": self._worker.queue_depth,
            "running": self._worker.running,
            "evictions": tiers["memory"].get("evictions", 0),
            "tiers": tiers,
            "response_cache": self._responses.stats(),
            "config": config_summary(self.config),
        }

    # ---- internals -------------------------------------------------------------------------

    def _answer_or_submit(self, query: Any) -> dict[str, Any] | Future[dict[str, Any]]:
        """The response cache's answer, or the future of the request queued for the model."""
        started = time.perf_counter()
        request = self._parse(query)
        cached = self._cached_response(request, started)
        if cached is not None:
            return cached
        return self._worker.submit(lambda: self._run(request, started), request.priority)

    def _parse(self, query: Any) -> GenerationRequest:
        try:
            return parse_request(query, self.config)
        except InvalidRequestError as exc:
            self._stats.record_error(invalid=True)
            self._listeners.notify({"status": "error", "error": type(exc).__name__, "invalid": True})
            raise

    def _cached_response(self, request: GenerationRequest, started: float) -> dict[str, Any] | None:
        hit = self._cached_answer(request, started)
        return None if hit is None else hit[0].answer(hit[1], request.request_id)

    def _cached_answer(self, request: GenerationRequest, started: float) -> tuple[StoredAnswer, float] | None:
        """The response cache's stored answer and this request's latency (ms), stats and listeners
        done; None on a miss or when the request may not be answered from the cache."""
        if not (self.config.response_cache and request.use_response_cache and self._model is not None):
            return None
        key = request_key(self._model.fingerprint, request.prompt, request.params)
        stored = self._responses.get_derived(key, StoredAnswer.from_stored)
        if stored is None:
            return None
        latency = (time.perf_counter() - started) * 1000
        self._stats.record(
            prompt_tokens=stored.prompt_tokens,
            cached_tokens=stored.prompt_tokens,
            completion_tokens=stored.completion_tokens,
            latency_ms=latency,
            ttft_ms=latency,
            response_cached=True,
        )
        if self._listeners:
            self._listeners.notify(stored.answer(latency, request.request_id, status="ok"))
        return stored, latency

    def _load(self) -> LoadedModel:
        if self._model is None:
            self._adopt(load_model(self.config))
        assert self._model is not None
        return self._model

    def _adopt(self, model: LoadedModel) -> None:
        self._prefix = PrefixCache(
            self.config,
            model.fingerprint,
            model.dtype,
            model.block_shape(self.config.block_size),
            lower=build_lower_tiers(self.config),
        )
        self._arena = hf_cache.KVArena(
            model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, model.device
        )
        self._model = model

    def _warmup_job(self) -> None:
        if not self._warm.is_set():
            self._run(
                parse_request({"query": "warmup", "max_new_tokens": 1, "response_cache": False}, self.config),
                time.perf_counter(),
                record=False,
            )
            self._warm.set()

    def _run(
        self,
        request: GenerationRequest,
        started: float,
        on_step: OnStep | None = None,
        cancelled: threading.Event | None = None,
        record: bool = True,
    ) -> dict[str, Any]:
        try:
            lm = self._load()
            assert self._prefix is not None and self._arena is not None
            result = generate(lm, self._prefix, self._arena, request, started, on_step, cancelled)
        except Exception as exc:
            if record:
                invalid = isinstance(exc, InvalidRequestError)
                self._stats.record_error(invalid=invalid)
                self._listeners.notify({"status": "error", "error": type(exc).__name__, "invalid": invalid})
            raise
        if record:
            self._stats.record(
                prompt_tokens=result["prompt_tokens"],
                cached_tokens=result["cached_tokens"],
                completion_tokens=result["completion_tokens"],
                latency_ms=result["latency"],
                ttft_ms=result["ttft_ms"],
                response_cached=False,
            )
            self._listeners.notify({**result, "status": "ok"})
        if (
            self.config.response_cache
            and request.use_response_cache
            and result["finish_reason"] != "cancelled"
        ):
            self._responses.put(request_key(self._model.fingerprint, request.prompt, request.params), result)
        return result

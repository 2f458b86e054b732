"""`UltraAdaptiveKVCacheEngine`: requests in, answers out, with every reusable KV block reused.

A request goes: parse and check (caller's thread) -> response cache (caller's thread, no queue) ->
the step loop on the model thread (`bulk.engine.loop`): queued by priority, admitted when it fits,
its prompt computed after the longest cached prefix, then decoded together with every other running
request, one token per step, its new full blocks stored. The model is loaded lazily on the model
thread, so building an engine at import time (as the guide's examples do) is free, and `warmup()`
only makes the first request fast. This module is the public face: parsing, the response cache,
futures and streams, stats; it imports no web framework."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from bulk.config import KVCacheConfig
from bulk.engine import chat
from bulk.engine.loop import EngineLoop, LogitsObserver
from bulk.engine.model_runner import ModelRunner
from bulk.engine.model_thread import ModelThread
from bulk.engine.request import GenerationRequest, parse_request
from bulk.engine.response_cache import ResponseCache, StoredAnswer, json_bytes, request_key
from bulk.engine.result import LOGPROBS_FIELD, GenerationResult
from bulk.engine.sequence import OnToken, Sequence
from bulk.engine.stats import EngineStats, Listeners, config_summary
from bulk.errors import EngineClosedError, InvalidRequestError
from bulk.kv import quantization
from bulk.models.loader import LoadedModel, load_model
from bulk.storage.factory import build_lower_tiers
from bulk.storage.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

WARMUP_PRIORITY = 2**31  # ahead of any request
SHUTDOWN_PRIORITY = 2**32  # ahead of everything
STEP_PRIORITY = 0  # the step loop's job; requests' own priorities are the scheduler's business


class UltraAdaptiveKVCacheEngine:
    def __init__(
        self,
        config: KVCacheConfig | None = None,
        *,
        model: LoadedModel | None = None,
        model_thread: ModelThread | None = None,
        logits_observer: LogitsObserver | None = None,
    ) -> None:
        """`model`: an already loaded model to share (tests, benchmarks comparing configurations); by
        default the engine loads `config.model` itself on first use. `model_thread`: a model thread to
        share; engines sharing a model should share it, since a model runs one forward at a time (their
        step loops then take turns). An engine shuts down only a thread it created.
        `logits_observer(sequence, logits)`: called on the model thread with the logits each token was
        sampled from (tests and tools)."""
        self.config = config if config is not None else KVCacheConfig()
        self._owns_thread = model_thread is None
        self._thread = model_thread if model_thread is not None else ModelThread()
        self._logits_observer = logits_observer
        self._model: LoadedModel | None = None
        self._prefix: PrefixCache | None = None
        self._loop: EngineLoop | None = None
        self._inbox: deque[Sequence] = deque()  # submitted, not yet taken in by the step loop
        self._lock = threading.Lock()  # guards `_driving` and `_closed`
        self._load_lock = threading.Lock()  # held while the model loads (seconds): never by `_submit`
        self._driving = False  # a step-loop job is queued or running
        self._closed = False
        self._responses = ResponseCache(self.config.response_cache_size, self.config.response_cache_ttl)
        self._stats = EngineStats()
        self._warm = threading.Event()
        self._listeners = Listeners()
        if model is not None:
            self._adopt(model)

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
        await asyncio.wrap_future(self._thread.submit(self._warmup_job, WARMUP_PRIORITY))

    def warmup_sync(self) -> None:
        self._thread.submit(self._warmup_job, WARMUP_PRIORITY).result()

    def shutdown(self) -> None:
        """Fail the requests still waiting, finish the running ones, stop the model thread (if this
        engine created it). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._thread.is_current:
            with contextlib.suppress(EngineClosedError):  # a shared thread already stopped
                self._thread.submit(self._drain, SHUTDOWN_PRIORITY).result()
            if self._owns_thread:
                self._thread.shutdown(wait=True)
        # Whatever is left (the thread stopped before it could drain) fails rather than hangs.
        closed = EngineClosedError("the engine was shut down")
        for seq in self._abandoned():
            self._retired(seq, closed)
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

    def parse(self, query: Any) -> GenerationRequest:
        """Check a request dict once (an `InvalidRequestError` names the field, and counts as an
        invalid request); the result can be passed to every `process_*` method instead of the
        dict, so a layer that must check a request before answering does not parse it twice."""
        try:
            return parse_request(query, self.config)
        except InvalidRequestError as exc:
            self._stats.record_error(invalid=True)
            self._listeners.notify({"status": "error", "error": type(exc).__name__, "invalid": True})
            raise

    async def process_request(self, query: Any) -> GenerationResult:
        started = time.perf_counter()
        request = self.parse(query)
        cached = self._cached_response(request, started)
        if cached is not None:
            return cached
        return await asyncio.wrap_future(self._submit(request, started).future)

    def process_request_sync(self, query: Any) -> GenerationResult:
        started = time.perf_counter()
        request = self.parse(query)
        cached = self._cached_response(request, started)
        if cached is not None:
            return cached
        return self._submit(request, started).future.result()

    async def process_request_json(self, query: Any) -> bytes:
        """`process_request`'s answer as compact UTF-8 JSON, for HTTP layers: same fields, stats and
        listener events. An answer from the response cache is assembled from the stored JSON text
        instead of being decoded and encoded again per request."""
        started = time.perf_counter()
        request = self.parse(query)
        hit = self._cached_answer(request, started)
        if hit is not None:
            stored, latency = hit
            return stored.answer_json(latency, request.request_id)
        return json_bytes(await asyncio.wrap_future(self._submit(request, started).future))

    async def stream_request(self, query: Any) -> AsyncGenerator[dict[str, Any], None]:
        """Yield `{"token": text}` as tokens come (with `"logprobs"`, a list of `TokenLogprobs`, when the
        request asks for them), then the full result with `"done": True`.
        Stopping the iteration early cancels the generation (its slot is free at the next step)."""
        started = time.perf_counter()
        request = self.parse(query)
        cached = self._cached_response(request, started)
        if cached is not None:
            yield {"token": cached["result"]}
            yield {**cached, "done": True}
            return
        loop = asyncio.get_running_loop()
        texts: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        # A request asking for logprobs: each event carries the entries of the tokens it completes
        # (a token that ends inside a character comes with the next text; those of a stop string,
        # which has no text, only in the result).
        sent = 0
        submitted: list[Sequence] = []

        def on_token(text: str) -> None:  # on the model thread
            nonlocal sent
            event: dict[str, Any] = {"token": text}
            entries = submitted[0].logprobs if submitted else None
            if entries is not None:
                event[LOGPROBS_FIELD] = entries[sent:]
                sent = len(entries)
            loop.call_soon_threadsafe(texts.put_nowait, event)

        seq = self._submit(request, started, on_token)
        submitted.append(seq)
        done = asyncio.wrap_future(seq.future)
        # The model thread hands over each token, then the result, in that order; the None after
        # the result ends the token stream.
        done.add_done_callback(lambda _: texts.put_nowait(None))
        try:
            while (event := await texts.get()) is not None:
                yield event
            yield {**done.result(), "done": True}
        finally:
            seq.cancel()  # a no-op once it has finished

    # ---- the guide's key-value API (response cache) ------------------------------------------

    async def get_from_cache(self, key: str) -> Any | None:
        return self._responses.get("user:" + key)

    async def store_in_cache(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._responses.put("user:" + key, value, ttl)

    # ---- stats -----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call `listener(event)` when a request ends: its result dict with `"status": "ok"`, or
        `{"status": "error", "error": <class name>, "invalid": bool}`. Metrics exporters hook in here
        so the engine knows nothing of them. It runs on the thread that ended the request (the model
        thread, for a generated answer), so it must be quick; its exceptions are logged and
        dropped."""
        self._listeners.append(listener)

    async def fetch_stats(self) -> dict[str, Any]:
        """`get_stats()`, for callers written against `ServingEngine` (a cluster's client fetches its
        figures from the replicas; this engine has them at hand)."""
        return self.get_stats()

    def cached_blocks(self, limit: int | None = None) -> dict[str, Any]:
        """What the memory tier holds, for a router that sends each request where its prefix is:
        `{"namespace": hex, "block_size", "capacity_blocks", "digests": [bytes, ...]}`, the chained
        hashes (`bulk.kv.hashing`) of the cached blocks, at most `limit` of them. Every cached block's
        parent is cached too, so a chain is cached up to its first block missing here. Empty before
        the model is loaded."""
        if self._prefix is None:
            return {
                "namespace": None,
                "block_size": self.config.block_size,
                "capacity_blocks": 0,
                "digests": [],
            }
        return {
            "namespace": self._prefix.namespace.hex(),
            "block_size": self._prefix.block_size,
            "capacity_blocks": self._prefix.manager.capacity_blocks,
            "digests": self._prefix.manager.digests(limit),
        }

    def get_stats(self) -> dict[str, Any]:
        tiers = self._prefix.stats() if self._prefix is not None else {"memory": {}}
        stats = self._stats.snapshot()
        if self._loop is not None:
            batching = self._loop.snapshot()
        else:
            batching = {
                "running": 0,
                "waiting": len(self._inbox),
                "kv_tokens_in_use": 0,
                "kv_bytes_in_use": 0,
            }
        return {
            **stats,
            "model": self.config.model,
            "ready": self.ready,
            "queue_depth": batching.pop("waiting"),
            "running": batching.pop("running"),
            "batch": {**stats["batch"], **batching, "batch_invariant": self.config.batch_invariant},
            "evictions": tiers["memory"].get("evictions", 0),
            "tiers": tiers,
            "response_cache": self._responses.stats(),
            "config": config_summary(self.config, self._model),
        }

    # ---- internals: the response cache -------------------------------------------------------

    def _cached_response(self, request: GenerationRequest, started: float) -> GenerationResult | None:
        hit = self._cached_answer(request, started)
        # The stored answer is a `GenerationResult` (`_finish` stores it) with its per-request fields renewed.
        return None if hit is None else cast(GenerationResult, hit[0].answer(hit[1], request.request_id))

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

    # ---- internals: the model thread ---------------------------------------------------------

    def _submit(
        self, request: GenerationRequest, started: float, on_token: OnToken | None = None, record: bool = True
    ) -> Sequence:
        """Queue `request` for the step loop; its answer arrives on `sequence.future`."""
        seq = Sequence(request, started, on_token, record=record)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
        self._inbox.append(seq)
        self._kick()
        return seq

    def _kick(self) -> None:
        """Make sure a step-loop job is queued or running on the model thread."""
        with self._lock:
            if self._driving:
                return
            self._driving = True
        try:
            self._thread.submit(self._drive, STEP_PRIORITY)
        except EngineClosedError:
            with self._lock:
                self._driving = False
            raise

    def _drive(self) -> None:
        """The step-loop job: step while there is work. When other jobs wait for the thread (another
        engine's loop, a warmup, a benchmark's baseline), queue this job again and let them run."""
        try:
            loop = self._ensure_loop()
        except Exception as exc:
            log.exception("cannot load model %s", self.config.model)
            with self._lock:
                self._driving = False
            for seq in self._abandoned():
                self._retired(seq, exc)
            return
        while True:
            try:
                loop.step()
            except Exception as exc:  # a bug in the loop itself: fail what it held, keep serving
                log.exception("the step loop failed; failing its %d requests", len(loop.scheduler.running))
                for seq in self._abandoned():
                    self._retired(seq, exc)
            with self._lock:
                if not loop.has_work:
                    self._driving = False
                    return
            if self._thread.queue_depth:
                self._thread.submit(self._drive, STEP_PRIORITY)
                return

    def _drain(self) -> None:
        """Shutdown, on the model thread: fail what waits, finish what runs."""
        closed = EngineClosedError("the engine was shut down")
        if self._loop is None:
            return
        for seq in self._loop.drain_waiting():
            self._retired(seq, closed)
        while self._loop.has_work:
            self._loop.step()

    def _abandoned(self) -> list[Sequence]:
        """Every request not answered yet, taken out of the loop (which no longer runs)."""
        pending = list(self._inbox)
        self._inbox.clear()
        if self._loop is not None:
            pending += self._loop.drain_waiting()
            for seq in list(self._loop.scheduler.running):
                self._loop.runner.release(seq)
                self._loop.scheduler.finish(seq)
                pending.append(seq)
        return pending

    def _warmup_job(self) -> None:
        if self._warm.is_set():
            return
        loop = self._ensure_loop()
        request = parse_request(
            {"query": "warmup", "max_new_tokens": 1, "response_cache": False}, self.config
        )
        seq = self._submit_direct(request)
        while not seq.future.done():
            loop.step()
        seq.future.result()
        self._warm.set()

    def _submit_direct(self, request: GenerationRequest) -> Sequence:
        """Queue an unrecorded request from the model thread itself (no step-loop job needed)."""
        seq = Sequence(request, time.perf_counter(), record=False)
        self._inbox.append(seq)
        return seq

    def _retired(self, seq: Sequence, error: BaseException | None) -> None:
        """The step loop is done with `seq`: record it, answer it."""
        if seq.future.done():
            return  # cancelled by its caller, who no longer waits
        if error is not None:
            if seq.record:
                invalid = isinstance(error, InvalidRequestError)
                self._stats.record_error(invalid=invalid)
                self._listeners.notify({"status": "error", "error": type(error).__name__, "invalid": invalid})
            _settle(seq, error=error)
            return
        assert self._model is not None
        result = seq.result(self._model.name)
        if seq.record:
            self._stats.record(
                prompt_tokens=result["prompt_tokens"],
                cached_tokens=result["cached_tokens"],
                completion_tokens=result["completion_tokens"],
                latency_ms=result["latency"],
                ttft_ms=result["ttft_ms"],
                response_cached=False,
            )
            self._listeners.notify({**result, "status": "ok"})
        request = seq.request
        if self.config.response_cache and request.use_response_cache and seq.finish_reason != "cancelled":
            self._responses.put(request_key(self._model.fingerprint, request.prompt, request.params), result)
        _settle(seq, result=result)

    # ---- internals: the model ----------------------------------------------------------------

    def _load(self) -> LoadedModel:
        with self._load_lock:
            if self._model is None:
                self._adopt(load_model(self.config))
            assert self._model is not None
            return self._model

    def _ensure_loop(self) -> EngineLoop:
        self._load()
        assert self._loop is not None
        return self._loop

    def _adopt(self, model: LoadedModel) -> None:
        self._prefix = PrefixCache(
            self.config,
            model.fingerprint,
            model.dtype,
            model.block_shape(self.config.block_size),
            lower=build_lower_tiers(self.config),
            # The stored blocks' codec, applied from here: the prefix cache only calls it.
            codec=quantization.codec(self.config.quantization),
        )
        runner = ModelRunner(model, self._prefix, self.config)
        notice = chat.missing_template_notice(model.tokenizer, model.name)
        if notice:
            log.warning(notice)
        self._loop = EngineLoop(runner, self._inbox, self._stats, self._retired, self._logits_observer)
        self._model = model


def _settle(
    seq: Sequence, *, result: GenerationResult | None = None, error: BaseException | None = None
) -> None:
    """Answer `seq`'s future, unless its caller cancelled it meanwhile (a race with `_retired`'s
    check: the future may be cancelled from another thread at any time)."""
    try:
        if error is not None:
            seq.future.set_exception(error)
        elif result is not None:
            seq.future.set_result(result)
    except Exception:  # InvalidStateError: cancelled by the caller
        log.debug("request %s was cancelled before its answer", seq.request.request_id)

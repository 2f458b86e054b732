"""Counters and latency windows behind `engine.get_stats()`."""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bulk.config import KVCacheConfig

if TYPE_CHECKING:
    from bulk.models.loader import LoadedModel

log = logging.getLogger(__name__)

WINDOW = 2048  # recent requests kept for percentiles
# Bounds (seconds) of the cumulative latency histograms in `get_stats()["histograms"]`, which metrics
# exporters publish as they are: the integration guide's (0.001 ... 1.0), then more above (a model on
# a CPU often takes seconds).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Inter-token latency: the time between two tokens of one request, as the model thread emits them.
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Requests decoded together in one step.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
THROUGHPUT_WINDOW = 10.0  # seconds over which generated tokens per second are averaged
# The whole-number counts at the top level of `engine.get_stats()` (counters, and the queue and
# running gauges): what a cluster sums over its replicas and gRPC's `StatsResponse` carries as integers.
COUNTS = (
    "requests",
    "cache_hits",
    "response_cache_hits",
    "prefix_hits",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "errors",
    "invalid_requests",
    "queue_depth",
    "running",
    "evictions",
)


class BucketCounts:
    """A cumulative histogram since start: counts per bound (`le`, inclusive), a sum and a count.
    Kept by the engine so that exporting it costs the request path one bisect, no listener call."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, object]:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append([bound, cumulative])
        return {"buckets": buckets, "sum": self.sum, "count": cumulative}


class LatencyWindow:
    def __init__(self, size: int = WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value_ms: float) -> None:
        self._values.append(value_ms)

    def summary(self) -> dict[str, float | None]:
        values = sorted(self._values)
        if not values:
            return {"p50": None, "p95": None, "p99": None, "mean": None}

        def pct(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))], 3)

        return {
            "p50": pct(0.50),
            "p95": pct(0.95),
            "p99": pct(0.99),
            "mean": round(sum(values) / len(values), 3),
        }


class RateMeter:
    """Events per second over the last `window` seconds (or since the first event, if sooner)."""

    def __init__(self, window: float = THROUGHPUT_WINDOW) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()  # (time, count), oldest first
        self._total = 0
        self._first: float | None = None

    def add(self, count: int, now: float) -> None:
        self._events.append((now, count))
        self._total += count
        if self._first is None:
            self._first = now
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._total -= self._events.popleft()[1]

    def rate(self, now: float) -> float:
        self._expire(now)
        if self._first is None or not self._events:
            return 0.0
        span = min(self.window, max(now - self._first, 1e-3))
        return self._total / span


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.response_cache_hits = 0
        self.prefix_hits = 0  # requests that reused at least one KV block
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.errors = 0
        self.invalid_requests = 0
        self.latency = LatencyWindow()
        self.ttft = LatencyWindow()
        self.latency_buckets = BucketCounts(LATENCY_BUCKETS)
        self.ttft_buckets = BucketCounts(TTFT_BUCKETS)
        # Batching, recorded by the step loop.
        self.decode_steps = 0
        self.decode_rows = 0  # sum of batch sizes: decode_rows / decode_steps is the mean batch
        self.last_batch_size = 0
        self.batch_size_buckets = BucketCounts(BATCH_SIZE_BUCKETS)
        self.itl = LatencyWindow()
        self.itl_buckets = BucketCounts(ITL_BUCKETS)
        self.generated = RateMeter()

    def record(
        self,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        ttft_ms: float,
        response_cached: bool,
    ) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.completion_tokens += completion_tokens
            if response_cached:
                self.response_cache_hits += 1
            elif cached_tokens:
                self.prefix_hits += 1
            self.latency.add(latency_ms)
            self.ttft.add(ttft_ms)
            self.latency_buckets.add(latency_ms / 1000)
            self.ttft_buckets.add(ttft_ms / 1000)

    def record_decode_step(self, rows: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows
            self.last_batch_size = rows
            self.batch_size_buckets.add(rows)

    def record_token_interval(self, seconds: float) -> None:
        with self._lock:
            self.itl.add(seconds * 1000)
            self.itl_buckets.add(seconds)

    def record_generated(self, tokens: int, now: float) -> None:
        with self._lock:
            self.generated.add(tokens, now)

    def record_error(self, invalid: bool) -> None:
        with self._lock:
            if invalid:
                self.invalid_requests += 1
            else:
                self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            hits = self.response_cache_hits + self.prefix_hits
            return {
                "requests": self.requests,
                "cache_hits": hits,
                "hit_rate": round(hits / self.requests, 4) if self.requests else 0.0,
                "response_cache_hits": self.response_cache_hits,
                "prefix_hits": self.prefix_hits,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "token_hit_rate": round(self.cached_tokens / self.prompt_tokens, 4)
                if self.prompt_tokens
                else 0.0,
                "completion_tokens": self.completion_tokens,
                "errors": self.errors,
                "invalid_requests": self.invalid_requests,
                "latency_ms": self.latency.summary(),
                "ttft_ms": self.ttft.summary(),
                "itl_ms": self.itl.summary(),
                "batch": {
                    "decode_steps": self.decode_steps,
                    "decode_rows": self.decode_rows,
                    "mean_size": round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0,
                    "last_size": self.last_batch_size,
                },
                "generated_tokens_per_second": round(self.generated.rate(time.monotonic()), 3),
                "histograms": {
                    "latency_seconds": self.latency_buckets.snapshot(),
                    "ttft_seconds": self.ttft_buckets.snapshot(),
                    "itl_seconds": self.itl_buckets.snapshot(),
                    "batch_size": self.batch_size_buckets.snapshot(),
                },
            }


def config_summary(config: KVCacheConfig, model: LoadedModel | None = None) -> dict[str, object]:
    """The settings that explain the numbers, for `get_stats()`; with the loaded `model`, the dtype
    and weight quantization that `auto` resolved to (None until it is loaded)."""
    signed = config.signing_secret() is not None
    return {
        "dtype": model.dtype_name if model is not None else None,
        "weight_quantization": model.weight_quantization if model is not None else None,
        "max_tokens": config.max_tokens,
        "block_size": config.block_size,
        "cache_strategy": config.cache_strategy.value,
        "quantization": config.quantization,
        "tiers": ["memory"]
        + (["disk"] if config.enable_persistence else [])
        + (["redis"] if config.redis_url else [])
        + (["postgres"] if config.database_url else []),
        # How stored blocks are tagged: "hmac-sha256" (keyed: forgeries are refused) or "sha256"
        # (corruption only); true below only under the explicit allow_unsigned_shared_tiers opt-out.
        "block_tag": "hmac-sha256" if signed else "sha256",
        "unsigned_shared_tiers": bool(config.shared_tiers) and not signed,
    }


class Listeners(list[Callable[[dict[str, Any]], None]]):
    """The engine's request listeners (`engine.add_listener`)."""

    def notify(self, event: dict[str, Any]) -> None:
        for listener in self:
            try:
                listener(event)
            except Exception:
                log.exception("engine listener %r failed", listener)

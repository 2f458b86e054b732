"""Counters and latency windows behind `engine.get_stats()`."""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

from bulk.config import KVCacheConfig

log = logging.getLogger(__name__)

WINDOW = 2048  # recent requests kept for percentiles
# Bounds (seconds) of the cumulative latency histograms in `get_stats()["histograms"]`, which metrics
# exporters publish as they are: the integration guide's (0.001 ... 1.0), then more above (a model on
# a CPU often takes seconds).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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

    def record_error(self, invalid: bool) -> None:
        with self._lock:
            if invalid:
                self.invalid_requests += 1
            else:
                self.errors += 1

    def snapshot(self) -> dict[str, object]:
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
                "histograms": {
                    "latency_seconds": self.latency_buckets.snapshot(),
                    "ttft_seconds": self.ttft_buckets.snapshot(),
                },
            }


def config_summary(config: KVCacheConfig) -> dict[str, object]:
    """The settings that explain the numbers, for `get_stats()`."""
    return {
        "max_tokens": config.max_tokens,
        "block_size": config.block_size,
        "cache_strategy": config.cache_strategy.value,
        "quantization": config.quantization,
        "tiers": ["memory"]
        + (["disk"] if config.enable_persistence else [])
        + (["redis"] if config.redis_url else [])
        + (["postgres"] if config.database_url else []),
    }


class Listeners(list[Callable[[dict[str, Any]], None]]):
    """The engine's request listeners (`engine.add_listener`)."""

    def notify(self, event: dict[str, Any]) -> None:
        for listener in self:
            try:
                listener(event)
            except Exception:
                log.exception("engine listener %r failed", listener)

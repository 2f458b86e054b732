"""Messages <-> the engine's dicts. Checking values is the engine's job (it raises
`InvalidRequestError` naming the field); here only presence is decided: a field the client did not
set is left out, so the engine applies its own default."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from bulk.grpc_service.generated import bul_pb2

# QueryRequest fields with explicit presence that map one to one onto engine request keys.
_OPTIONAL_FIELDS = (
    "priority",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "session_id",
    "response_cache",
    "request_id",
)


def request_to_engine(message: bul_pb2.QueryRequest) -> dict[str, Any]:
    request: dict[str, Any] = {"query": message.query}
    for name in _OPTIONAL_FIELDS:
        if message.HasField(name):
            request[name] = getattr(message, name)
    if message.stop:
        request["stop"] = list(message.stop)
    return request


def result_to_response(result: Mapping[str, Any]) -> bul_pb2.QueryResponse:
    return bul_pb2.QueryResponse(
        result=result["result"],
        cache_hit=bool(result["cache_hit"]),
        latency_ms=float(result["latency"]),
        response_cached=bool(result.get("response_cached", False)),
        ttft_ms=float(result.get("ttft_ms") or 0.0),
        cached_tokens=int(result.get("cached_tokens", 0)),
        prompt_tokens=int(result.get("prompt_tokens", 0)),
        completion_tokens=int(result.get("completion_tokens", 0)),
        finish_reason=str(result.get("finish_reason", "")),
        request_id=str(result.get("request_id", "")),
        model=str(result.get("model", "")),
    )


def stats_to_response(stats: Mapping[str, Any]) -> bul_pb2.StatsResponse:
    """The typed fields for the keys every engine has; `details` carries the whole dict, so keys
    added to the engine later reach clients before this message grows a field for them."""
    response = bul_pb2.StatsResponse(
        **{name: int(stats.get(name) or 0) for name in _STATS_COUNTERS},
        hit_rate=float(stats.get("hit_rate") or 0.0),
        token_hit_rate=float(stats.get("token_hit_rate") or 0.0),
        model=str(stats.get("model", "")),
        ready=bool(stats.get("ready", False)),
        latency_ms=_latency(stats.get("latency_ms")),
        ttft_ms=_latency(stats.get("ttft_ms")),
        response_cache=bul_pb2.ResponseCacheStats(
            **{name: int((stats.get("response_cache") or {}).get(name) or 0) for name in _CACHE_COUNTERS}
        ),
        details=_struct(stats),
    )
    for name, tier in (stats.get("tiers") or {}).items():
        response.tiers[name].CopyFrom(
            bul_pb2.TierStats(
                **{key: int(tier.get(key) or 0) for key in _TIER_COUNTERS},
                healthy=bool(tier.get("healthy", True)),
            )
        )
    return response


_STATS_COUNTERS = (
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
_CACHE_COUNTERS = ("entries", "hits", "misses", "size_bytes")
_TIER_COUNTERS = ("hits", "misses", "errors", "size_bytes")


def _latency(summary: Mapping[str, Any] | None) -> bul_pb2.LatencySummary:
    # Percentiles are None before the first request: left unset rather than reported as 0 ms.
    values = {key: float(value) for key, value in (summary or {}).items() if value is not None}
    return bul_pb2.LatencySummary(**{k: v for k, v in values.items() if k in ("p50", "p95", "p99", "mean")})


def _struct(stats: Mapping[str, Any]) -> struct_pb2.Struct:
    # A JSON round trip turns tuples into lists and anything unexpected into a string, which is
    # what Struct accepts; get_stats() is JSON-able by contract, so this loses nothing there.
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(stats, default=str)))
    return struct

"""One cluster's figures from its replicas' `engine.get_stats()`: totals in the engine's own shape
(so every consumer of `get_stats()`, `/metrics` included, reads a cluster as it reads one engine),
plus a `replicas` entry per replica and the router's `routing` counts.

Totals: counters and gauges are summed; rates are recomputed from the summed counters; percentiles
cannot be merged from percentiles, so the totals' `latency_ms`, `ttft_ms` and `itl_ms` are estimated
from the merged histograms (linear within a bucket, as Prometheus' `histogram_quantile` does) and say
so (`"estimated": true`); each replica's own stay exact. A Redis or PostgreSQL tier is one store
shared by every replica: its size and block count are the largest any replica reports, not a sum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bulk.engine.stats import COUNTS

SUMMED = (*COUNTS, "generated_tokens_per_second")
SHARED_TIERS = ("redis", "postgres")
SHARED_GAUGES = ("blocks", "size_bytes", "capacity_blocks", "tokens")
PERCENTILES = (("latency_ms", "latency_seconds"), ("ttft_ms", "ttft_seconds"), ("itl_ms", "itl_seconds"))


def replica_summary(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The per-replica figures of the cluster view: requests, token hit rates, memory tier, queue."""
    memory = (stats.get("tiers") or {}).get("memory") or {}
    queries, hits = memory.get("token_queries", 0), memory.get("token_hits", 0)
    return {
        "ready": bool(stats.get("ready")),
        "requests": stats.get("requests", 0),
        "errors": stats.get("errors", 0),
        "prompt_tokens": stats.get("prompt_tokens", 0),
        "cached_tokens": stats.get("cached_tokens", 0),
        "completion_tokens": stats.get("completion_tokens", 0),
        "token_hit_rate": stats.get("token_hit_rate", 0.0),
        # Tokens found in this replica's memory tier, of those looked up there (before any lower tier).
        "memory_token_queries": queries,
        "memory_token_hits": hits,
        "memory_token_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "memory_tokens": memory.get("tokens", 0),
        "memory_blocks": memory.get("blocks", 0),
        "memory_capacity_blocks": memory.get("capacity_blocks", 0),
        "memory_size_bytes": memory.get("size_bytes", 0),
        "queue_depth": stats.get("queue_depth", 0),
        "running": stats.get("running", 0),
        "generated_tokens_per_second": stats.get("generated_tokens_per_second", 0.0),
        "ttft_ms": stats.get("ttft_ms"),
    }


def merge_stats(
    per_replica: Mapping[str, Mapping[str, Any]],
    routing: Mapping[str, Any] | None = None,
    ingress_invalid: int = 0,
) -> dict[str, Any]:
    """The cluster view of `per_replica` (replica id -> its `get_stats()`). `routing`: the router's
    `routing_snapshot()`; `ingress_invalid`: requests the ingress refused before any replica saw
    them."""
    replicas = [per_replica[r] for r in sorted(per_replica)]
    total: dict[str, Any] = {key: _sum(replicas, key) for key in SUMMED}
    total["invalid_requests"] += ingress_invalid
    total["hit_rate"] = _rate(total["cache_hits"], total["requests"])
    total["token_hit_rate"] = _rate(total["cached_tokens"], total["prompt_tokens"])
    total["generated_tokens_per_second"] = round(total["generated_tokens_per_second"], 3)
    total["histograms"] = _merge_histograms([r.get("histograms") or {} for r in replicas])
    for summary, histogram in PERCENTILES:
        total[summary] = _estimated(total["histograms"].get(histogram))
    total["batch"] = _merge_batch([r.get("batch") or {} for r in replicas])
    total["tiers"] = _merge_tiers([r.get("tiers") or {} for r in replicas])
    total["response_cache"] = _merge_numbers([r.get("response_cache") or {} for r in replicas])
    total["model"] = next((r.get("model") for r in replicas), None)
    total["config"] = next((r.get("config") for r in replicas), {})
    total["ready"] = any(r.get("ready") for r in replicas)

    routing = routing or {}
    decisions: Mapping[str, Mapping[str, int]] = routing.get("decisions") or {}
    inflight: Mapping[str, int] = routing.get("inflight") or {}
    views = {}
    for replica in sorted(per_replica):
        views[replica] = {
            **replica_summary(per_replica[replica]),
            "routed": dict(decisions.get(replica, {})),
            "inflight": inflight.get(replica, 0),
        }
    by_reason: dict[str, int] = {}
    for counts in decisions.values():
        for reason, n in counts.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    total["replicas"] = views
    total["routing"] = {"policy": routing.get("policy"), "decisions": by_reason}
    if "chains" in routing:  # the prefix-aware router computes chains (tokenizer and namespace known)
        total["routing"]["chains"] = routing["chains"]
    return total


def _sum(replicas: list[Mapping[str, Any]], key: str) -> Any:
    return sum(_number(r.get(key, 0)) for r in replicas)


def _number(value: Any) -> int | float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _rate(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def _merge_numbers(dicts: list[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, bool):
                merged[key] = merged.get(key, True) and value
            elif isinstance(value, int | float):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    return merged


def _merge_batch(batches: list[Mapping[str, Any]]) -> dict[str, Any]:
    merged = _merge_numbers(batches)
    steps = merged.get("decode_steps", 0)
    merged["mean_size"] = round(merged.get("decode_rows", 0) / steps, 3) if steps else 0.0
    if batches:
        merged["batch_invariant"] = bool(batches[0].get("batch_invariant"))
    return merged


def _merge_tiers(tiers: list[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    names = sorted({name for t in tiers for name in t}, key=lambda n: (n != "memory", n))
    merged: dict[str, Any] = {}
    for name in names:
        parts = [t[name] for t in tiers if name in t]
        tier = _merge_numbers(parts)
        if name in SHARED_TIERS:
            for gauge in SHARED_GAUGES:
                if any(gauge in p for p in parts):
                    tier[gauge] = max(_number(p.get(gauge, 0)) for p in parts)
        for fixed in ("block_size", "block_bytes"):
            if parts and fixed in parts[0]:
                tier[fixed] = parts[0][fixed]
        merged[name] = tier
    return merged


def _merge_histograms(histograms: list[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for histogram in histograms:
        for name, data in histogram.items():
            if name not in merged:
                merged[name] = {
                    "buckets": [[bound, count] for bound, count in data["buckets"]],
                    "sum": data["sum"],
                    "count": data["count"],
                }
                continue
            target = merged[name]
            if [b for b, _ in target["buckets"]] != [b for b, _ in data["buckets"]]:
                continue  # other bounds (another version): not mergeable, left out
            for pair, (_, count) in zip(target["buckets"], data["buckets"], strict=True):
                pair[1] += count
            target["sum"] += data["sum"]
            target["count"] += data["count"]
    return merged


def _estimated(histogram: Mapping[str, Any] | None) -> dict[str, Any]:
    """p50/p95/p99/mean in ms from a cumulative histogram in seconds."""
    if not histogram or not histogram.get("count"):
        return {"p50": None, "p95": None, "p99": None, "mean": None, "estimated": True}
    count = histogram["count"]
    out: dict[str, Any] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        out[name] = _quantile(histogram["buckets"], q, count)
    out["mean"] = round(histogram["sum"] / count * 1000, 3)
    out["estimated"] = True
    return out


def _quantile(buckets: list[list[Any]], q: float, count: int) -> float | None:
    rank = q * count
    lower, below = 0.0, 0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == "+Inf":
                return round(lower * 1000, 3)  # beyond the last bound: its value is the best known
            inside = cumulative - below
            fraction = (rank - below) / inside if inside else 1.0
            return round((lower + (float(bound) - lower) * fraction) * 1000, 3)
        if bound != "+Inf":
            lower, below = float(bound), cumulative
    return None

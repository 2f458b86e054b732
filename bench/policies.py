"""`bul bench policies`: our eviction policies against libCacheSim's references and Bélády's optimum.

For every trace of `bench.traces` (fixed seeds) and each of its cache sizes this runs

  ours          LRU, LFU and ADAPTIVE through `bulk.kv.policies.simulate` (the key-level simulator)
  references    libCacheSim's ARC, S3-FIFO and W-TinyLFU, and Bélády's optimum (MIN)
  cross-check   libCacheSim's LRU and LFU, which must agree with ours exactly on flat traces

and reports hit ratios, ADAPTIVE's gap to the best reference and to Bélády, and nanoseconds per
access. It prints one table per trace and a summary of the issue's targets, writes the figures as
JSON under `bench/results/` and a PNG (hit ratio against cache size, one subplot per trace) next to
it. The exit code is 0 whatever the figures are: this is a measurement.

Units. Every object has size 1 and libCacheSim's cache size (in bytes) is the capacity, so both sides
hold `capacity` keys. Bélády needs each request's next access time: the index of the next access of
the same key, or INT64_MAX when there is none (libCacheSim's oracleGeneral files store -1 there and
the reader turns it into INT64_MAX; a `Request` with -1 is an error to its Bélády).

KV-prefix traces (`trace.requests`). Ours run through `simulate_prefix`, the real block manager, and
score the token hit ratio. The references replay the flat key sequence (each request's blocks in
order) and are scored with the same prefix rule: a request's reused blocks are those before its first
miss; later hits in that request do not count. So every row of that table is a token hit ratio.
Bélády there is the flat-key optimum scored by the prefix rule: an upper reference, not the optimum
of the prefix problem, and no invariant holds against it.

Cost. Ours: wall time of `simulate` over the whole flat key sequence (for KV-prefix traces too, so
that the block manager's own work is not charged to the policy), per access, the median of
`--repeats` runs per (trace, capacity), the policies interleaved. libCacheSim: the same key sequence
replayed inside C (`process_trace` on an oracleGeneral file), so no Python call overhead; shown as
context. The target compares ADAPTIVE's mean cost with LRU's, both measured in this run.

    python -m bench.policies [--traces zipf-0.9,loop] [--repeats 3] [--max-accesses N]
    python -m bench.policies --quick        # reduced traces, one capacity each: the smoke test
    python -m bench.policies --seed-offset 1  # fresh traces of the same shapes (robustness)
"""

from __future__ import annotations

import argparse
import gc
import logging
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import libcachesim as lcs

from bench.common import median, write_results
from bench.policies_report import POLICIES, REFERENCES, plot, render, summarize
from bench.traces import Trace, all_traces
from bulk.kv.policies import simulate
from bulk.kv.prefix_simulation import simulate_prefix

log = logging.getLogger("bench.policies")

NAME = "policies"
OURS = ("lru", "lfu", "adaptive")
# libCacheSim policies: key -> (class, smallest capacity it runs correctly at). Below that size
# S3-FIFO's small queue (10 %) or W-TinyLFU's window (1 %) rounds to 0 objects: the library then
# caches nothing or aborts the whole process, so those cells are skipped (null in the JSON).
LIBCACHESIM: dict[str, tuple[type, int]] = {
    "arc": (lcs.ARC, 1),
    "s3fifo": (lcs.S3FIFO, 20),
    "wtinylfu": (lcs.WTinyLFU, 100),
    "belady": (lcs.Belady, 1),
    "lcs-lru": (lcs.LRU, 1),
    "lcs-lfu": (lcs.LFU, 1),
}
HASHPOWER = 18  # libCacheSim's hash table starts at 2^18 buckets and grows; it changes no result
NEVER = 2**63 - 1  # Bélády's "no next access" (INT64_MAX)

QUICK = {"max_accesses": 5_000, "max_requests": 200, "capacities": 1, "repeats": 1}
DEFAULTS = {"max_accesses": None, "max_requests": None, "capacities": None, "repeats": 3}


def next_access(keys: Sequence[int]) -> list[int]:
    """For each access, the index of the next access of the same key, or -1 when there is none."""
    out = [-1] * len(keys)
    seen: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        out[i] = seen.get(keys[i], -1)
        seen[keys[i]] = i
    return out


def write_oracle_trace(keys: Sequence[int], path: Path) -> None:
    """libCacheSim's oracleGeneral binary format: per request a packed (uint32 time, uint64 obj_id,
    uint32 size, int64 next access vtime, -1 for none), little-endian, 24 bytes."""
    record = struct.Struct("<IQIq")
    with path.open("wb") as f:
        for i, (key, nxt) in enumerate(zip(keys, next_access(keys), strict=True)):
            f.write(record.pack(i, key % (1 << 64), 1, nxt))


def libcachesim_hits(policy: str, keys: Sequence[int], capacity: int) -> list[bool]:
    """Per-access hit (True) or miss of a libCacheSim policy, replayed request by request."""
    cls, _ = LIBCACHESIM[policy]
    cache = cls(capacity, hashpower=HASHPOWER)
    req = lcs.Request()
    req.obj_size = 1
    nexts = next_access(keys) if policy == "belady" else None
    hits = []
    for i, key in enumerate(keys):
        req.obj_id = key % (1 << 64)
        if nexts is not None:
            req.next_access_vtime = nexts[i] if nexts[i] >= 0 else NEVER
        hits.append(bool(cache.get(req)))
    return hits


def prefix_score(requests: Sequence[Sequence[int]], hits: Sequence[bool]) -> float:
    """Token hit ratio of per-access outcomes over the flattened requests: each request counts its
    blocks up to its first miss."""
    reused = total = position = 0
    for request in requests:
        outcomes = hits[position : position + len(request)]
        position += len(request)
        total += len(request)
        for hit in outcomes:
            if not hit:
                break
            reused += 1
    if position != len(hits):
        raise ValueError("the outcomes do not cover the requests exactly")
    return reused / total if total else 0.0


def _timed(fn: Any) -> tuple[float, Any]:
    """Wall time of `fn()` in ns, with the garbage collector paused (the traces are millions of
    objects: a collection inside one timed run would be charged to that policy alone)."""
    gc.disable()
    try:
        started = time.perf_counter_ns()
        result = fn()
        return time.perf_counter_ns() - started, result
    finally:
        gc.enable()


def supported(policy: str, capacity: int) -> bool:
    return capacity >= LIBCACHESIM[policy][1]


def measure_trace(trace: Trace, repeats: int, workdir: Path) -> dict[str, Any]:
    """Every policy at every capacity of `trace`: hit ratios (token hit ratios for KV-prefix traces),
    flat hit ratios, and ns per access."""
    keys = trace.keys
    n = len(keys)
    oracle = workdir / f"{trace.name}.oracleGeneral.bin"
    write_oracle_trace(keys, oracle)
    reader = lcs.TraceReader(str(oracle), lcs.TraceType.ORACLE_GENERAL_TRACE)
    policies = (*OURS, *LIBCACHESIM)
    hit_ratio: dict[str, list[float | None]] = {p: [] for p in policies}
    flat: dict[str, list[float | None]] = {p: [] for p in policies}
    ns: dict[str, list[float | None]] = {p: [] for p in policies}
    for capacity in trace.capacities:
        # Ours, flat and timed: the policies interleaved, the order rotating every repeat.
        runs: dict[str, list[float]] = {p: [] for p in OURS}
        for rep in range(repeats):
            for policy in OURS[rep % 3 :] + OURS[: rep % 3]:
                elapsed, ratio = _timed(lambda p=policy, c=capacity: simulate(p, keys, c))
                runs[policy].append(elapsed / n)
                if rep == 0:
                    flat[policy].append(ratio)
        for policy in OURS:
            ns[policy].append(median(runs[policy]))
            if trace.requests is None:
                hit_ratio[policy].append(flat[policy][-1])
            else:
                hit_ratio[policy].append(simulate_prefix(policy, trace.requests, capacity))
        # libCacheSim, inside C.
        for policy, (cls, _) in LIBCACHESIM.items():
            if not supported(policy, capacity):
                for table in (hit_ratio, flat, ns):
                    table[policy].append(None)
                continue
            cache = cls(capacity, hashpower=HASHPOWER)  # built untimed: some allocate a lot up front
            elapsed, (miss_ratio, _) = _timed(lambda c=cache: c.process_trace(reader))
            flat[policy].append(1.0 - miss_ratio)
            ns[policy].append(elapsed / n)
            if trace.requests is None:
                hit_ratio[policy].append(1.0 - miss_ratio)
            else:
                hits = libcachesim_hits(policy, keys, capacity)
                hit_ratio[policy].append(prefix_score(trace.requests, hits))
        log.info(
            "%s c=%d: %s",
            trace.name,
            capacity,
            "  ".join(f"{p} {hit_ratio[p][-1]:.4f}" for p in POLICIES if hit_ratio[p][-1] is not None),
        )
    return {
        "description": trace.description,
        "kv_prefix": trace.requests is not None,
        "metric": "token hit ratio" if trace.requests is not None else "hit ratio",
        "accesses": n,
        "requests": None if trace.requests is None else len(trace.requests),
        "universe": trace.universe,
        "capacities": list(trace.capacities),
        "hit_ratio": hit_ratio,
        "flat_hit_ratio": flat,
        "ns_per_access": ns,
        "ns_per_access_source": {p: "python simulate()" if p in OURS else "libCacheSim C" for p in policies},
    }


def reduce_trace(
    trace: Trace, max_accesses: int | None, max_requests: int | None, capacities: int | None
) -> Trace:
    """`trace` cut to its first `max_requests` requests (KV-prefix) or `max_accesses` accesses, with
    its first `capacities` cache sizes; unchanged where an argument is None."""
    if trace.requests is not None and max_requests is not None:
        requests = trace.requests[:max_requests]
        trace = replace(trace, requests=requests, keys=[k for r in requests for k in r])
    elif trace.requests is None and max_accesses is not None:
        trace = replace(trace, keys=trace.keys[:max_accesses])
    if capacities is not None:
        trace = replace(trace, capacities=trace.capacities[:capacities])
    return trace


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bul bench policies",
        description="Hit ratios and cost per access of our LRU, LFU and ADAPTIVE against libCacheSim's "
        "ARC, S3-FIFO, W-TinyLFU and Bélády's optimum, on fixed-seed traces.",
    )
    parser.add_argument("--traces", help="comma-separated trace names (default: all)")
    parser.add_argument("--repeats", type=_positive, help="timed runs of ours per cell (default 3)")
    parser.add_argument(
        "--max-accesses", type=_positive, help="cut flat traces to their first N accesses (default: whole)"
    )
    parser.add_argument(
        "--max-requests",
        type=_positive,
        help="cut KV-prefix traces to their first N requests (default: whole)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="5000 accesses / 200 requests, one capacity each"
    )
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="add this to every trace's seed: fresh traces of the same shapes (default 0)",
    )
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    max_accesses = args.max_accesses or base["max_accesses"]
    max_requests = args.max_requests or base["max_requests"]
    repeats = args.repeats or base["repeats"]
    traces = all_traces(args.seed_offset)
    if args.traces:
        wanted = [name.strip() for name in args.traces.split(",") if name.strip()]
        known = {t.name: t for t in traces}
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted:
            raise SystemExit(f"unknown traces {unknown}; expected some of {sorted(known)}")
        traces = [known[name] for name in wanted]
    traces = [reduce_trace(t, max_accesses, max_requests, base["capacities"]) for t in traces]
    settings = {
        "traces": [t.name for t in traces],
        "repeats": repeats,
        "max_accesses": max_accesses,
        "max_requests": max_requests,
        "quick": args.quick,
        "seed_offset": args.seed_offset,
        "libcachesim": lcs.__version__,
        "object_size": 1,
    }
    log.info("policies: %s", settings)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        results = {t.name: measure_trace(t, repeats, Path(tmp)) for t in traces}
    settings["elapsed_s"] = round(time.perf_counter() - started, 1)
    summary = summarize(results)
    payload = {
        "settings": settings,
        "policies": {p: label for p, label in POLICIES.items()},
        "references": list(REFERENCES),
        "traces": results,
        "summary": summary,
    }
    path = write_results(NAME, payload, args.out)
    png = plot(results, path.with_suffix(".png"))
    (path.parent / f"{NAME}-latest.png").write_bytes(png.read_bytes())
    print(render(results, summary, settings))
    print(f"\nwritten: {path}\n         {png}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())

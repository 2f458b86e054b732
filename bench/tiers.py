"""`bul bench tiers`: time to first token with a long prefix found in each storage tier, the Redis
tier's read throughput against raw redis-py, and stored bytes per token under each quantization.

TTFT, for a prompt of `--length` tokens (a shared prefix plus a fresh 8-token question per run):

  recompute  an engine with nothing cached computes the whole prompt
  memory     the prefix is in the engine's memory tier
  disk       the engine's memory tier was emptied (`drop_memory_tier`): the prefix is promoted
             from its persistence directory
  redis      likewise, from Redis
  postgres   likewise, from PostgreSQL

Every run times all five in one interleaved sequence on one model thread, and each tier's speed-up
is the median of per-run ratios `recompute / tier`. Redis and PostgreSQL are skipped with a note when
they cannot be reached (`--redis-url`, `--database-url`; defaults are the local servers, database 15
and a scratch schema, emptied afterwards).

Read throughput: the prefix's stored blocks read back through the tier (`RedisStore.get_many`, one
pipelined round trip) and through the tier plus verification and decoding, against a loop of plain
redis-py `GET`s and one `MGET` of the same keys and bytes.

    python -m bench.tiers [--model demo-large] [--length 2048] [--runs 5]
    python -m bench.tiers --model smollm2-135m       # the real model
    python -m bench.tiers --quick     # demo model, short prompt: the smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import format_table, median, ratio, time_ms, write_results
from bench.prompts import filler, fit, new_tag
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.model_thread import ModelThread
from bulk.models.loader import LoadedModel, load_model
from bulk.storage.prefix_cache import PrefixCache
from bulk.storage.serialization import dumps

log = logging.getLogger("bench.tiers")

NAME = "tiers"
TIERS = ("memory", "disk", "redis", "postgres")
DEFAULTS = {"model": "demo-large", "length": 2048, "runs": 5}
QUICK = {"model": "demo", "length": 256, "runs": 2}
TARGET_SPEEDUP = 10.0
TARGET_READ_SHARE = 0.70


def _prefix(lm: LoadedModel, length: int) -> str:
    """The shared prefix: with any run's question after it, a prompt of exactly `length` tokens
    (whatever the tokenizer). It ends with a new line, so the question never merges into it."""
    tag = new_tag()
    return fit(lm.tokenizer, length, lambda c: filler(c, tag) + "\n" + _question(0))[: -len(_question(0))]


def _question(run: int) -> str:
    return f"Q{run:06d}?"


def _reachable(tier: str, config: KVCacheConfig) -> str | None:
    """None when the backend answers, else why not."""
    try:
        if tier == "redis":
            from bulk.storage.redis_store import RedisStore

            RedisStore(config.redis_url, timeout=2.0).ping()
        if tier == "postgres":
            from bulk.storage.postgres_store import PostgresTable

            PostgresTable(config.database_url, schema=config.database_schema, timeout=2.0).contains(b"x")
    except Exception as exc:
        return str(exc)
    return None


def _configs(args: argparse.Namespace, scratch: str, max_tokens: int) -> dict[str, KVCacheConfig]:
    # Redis and PostgreSQL tiers need a secret; the scratch data here may use a throwaway one.
    secret = os.environ.get("BUL_CACHE_SECRET") or secrets.token_hex(32)
    base = KVCacheConfig(
        model=args.model, dtype=args.dtype, max_tokens=max_tokens, response_cache=False, cache_secret=secret
    )
    return {
        "recompute": base,
        "memory": base,
        "disk": base.replace(enable_persistence=True, persistence_path=scratch),
        "redis": base.replace(redis_url=args.redis_url),
        "postgres": base.replace(database_url=args.database_url, database_schema=args.schema),
    }


def measure(lm: LoadedModel, configs: dict[str, KVCacheConfig], tiers: list[str], length: int, runs: int):
    """Median TTFT per scenario and the median per-run speed-up of each tier over recomputing."""
    worker = ModelThread()
    prefix = _prefix(lm, length)
    # One long-lived engine per scenario, as on a server: warm buffers, one model thread.
    engines = {
        t: UltraAdaptiveKVCacheEngine(configs[t], model=lm, model_thread=worker)
        for t in ["recompute", *tiers]
    }
    samples: dict[str, list[float]] = {t: [] for t in engines}
    try:
        for t in tiers:  # the prefix, stored once in every tier
            engines[t].process_request_sync({"query": prefix + "?", "raw": True, "max_new_tokens": 1})
            engines[t].flush_storage(60)
        for run in range(runs + 1):  # run 0 warms up and is dropped
            # raw: exactly these tokens, never wrapped in a chat template
            request = {"query": prefix + _question(run), "raw": True, "max_new_tokens": 1}
            timings = {}
            for t, engine in engines.items():
                if t != "memory":  # nothing in memory: recompute, or promote from the lower tier
                    engine.drop_memory_tier()
                answer = engine.process_request_sync(request)
                if answer["prompt_tokens"] != length:
                    raise AssertionError(f"{t}: {answer['prompt_tokens']} prompt tokens, not {length}")
                if t != "recompute" and answer["cached_tokens"] < length - 2 * configs[t].block_size:
                    raise AssertionError(f"{t}: reused only {answer['cached_tokens']} of {length} tokens")
                timings[t] = answer["ttft_ms"]
            if run:
                for t, ttft in timings.items():
                    samples[t].append(ttft)
            log.info("run %d: %s", run, {t: round(v, 1) for t, v in timings.items()})
    finally:
        for engine in engines.values():
            engine.shutdown()
        worker.shutdown()
    speedups = {
        t: median([ratio(a, b) or 0.0 for a, b in zip(samples["recompute"], samples[t], strict=True)])
        for t in tiers
    }
    return {t: median(v) for t, v in samples.items()}, speedups


def redis_read_throughput(lm: LoadedModel, config: KVCacheConfig, length: int, rounds: int) -> dict[str, Any]:
    """The prefix's serialized blocks, read back `rounds` times each way."""
    import redis

    from bulk.storage.redis_store import RedisStore
    from bulk.storage.serialization import loads

    cache = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(config.block_size))
    block = torch.randn(lm.block_shape(config.block_size)).to(lm.dtype)
    n_blocks = length // config.block_size
    keys = [i.to_bytes(32, "big") for i in range(n_blocks)]
    secret = config.signing_secret()  # tags checked as the tier checks them: HMAC-SHA256
    values = [dumps(k, cache.encode(block, tuple(range(config.block_size))), secret) for k in keys]
    store = RedisStore(config.redis_url, ttl=config.redis_ttl)
    store.put_many(zip(keys, values, strict=True))
    raw = redis.Redis.from_url(config.redis_url)
    names = [store._key(k) for k in keys]
    total = sum(map(len, values))

    ways = {
        "raw GET loop": lambda: [raw.get(name) for name in names],
        "raw MGET": lambda: raw.mget(names),
        "tier get_many": lambda: store.get_many(keys),
        "tier get_many + verify + decode": lambda: [
            cache.decode(loads(k, v, secret)) for k, v in zip(keys, store.get_many(keys), strict=True)
        ],
    }
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(rounds):
        for way, fn in ways.items():
            times[way].append(time_ms(fn)[0])
    store.clear()
    store.close()
    raw.close()
    mb = total / 1e6
    out = {way: {"ms": median(t), "mb_per_s": mb / (median(t) / 1000)} for way, t in times.items()}
    out["bytes"] = total
    out["share_of_raw_get"] = ratio(out["raw GET loop"]["ms"], out["tier get_many"]["ms"])
    return out


def bytes_per_token(lm: LoadedModel, block_size: int) -> dict[str, dict[str, float]]:
    out = {}
    for mode in ("none", "int8", "int4"):
        config = KVCacheConfig(model=lm.name, block_size=block_size, quantization=mode)
        cache = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(block_size))
        record = cache.encode(
            torch.zeros(lm.block_shape(block_size), dtype=lm.dtype), tuple(range(block_size))
        )
        out[mode] = {
            "memory": record.nbytes / block_size,
            "stored": len(dumps(bytes(32), record, None)) / block_size,
            "ratio_vs_model_dtype": lm.kv_bytes_per_token / (record.nbytes / block_size),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul bench tiers", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default demo-large; smollm2-135m: the real model")
    parser.add_argument("--dtype", default="auto", help="auto (the default), float32, bfloat16")
    parser.add_argument("--length", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.model = args.model or base["model"]
    length = args.length or base["length"]
    runs = args.runs or base["runs"]
    args.schema = f"bul_bench_{uuid.uuid4().hex[:8]}"

    lm = load_model(KVCacheConfig(model=args.model, dtype=args.dtype))
    scratch = tempfile.mkdtemp(prefix="bul-bench-tiers-")
    configs = _configs(args, scratch, max_tokens=4 * length)
    skipped = {t: why for t in ("redis", "postgres") if (why := _reachable(t, configs[t])) is not None}
    tiers = [t for t in TIERS if t not in skipped]
    try:
        ttft, speedups = measure(lm, configs, tiers, length, runs)
        reads = None if "redis" in skipped else redis_read_throughput(lm, configs["redis"], length, 5 * runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _cleanup(configs, skipped)
    sizes = bytes_per_token(lm, configs["memory"].block_size)
    print(_render(f"{args.model} ({lm.dtype_name})", length, runs, ttft, speedups, reads, sizes, skipped))
    path = write_results(
        NAME,
        {
            "settings": {"model": args.model, "length": length, "runs": runs, "dtype": lm.dtype_name},
            "ttft_ms": ttft,
            "speedup_vs_recompute": speedups,
            "redis_reads": reads,
            "bytes_per_token": sizes,
            "skipped": skipped,
        },
        args.out,
    )
    log.info("results written to %s", path)
    return 0


def _cleanup(configs: dict[str, KVCacheConfig], skipped: dict[str, str]) -> None:
    if "redis" not in skipped:
        from bulk.storage.redis_store import RedisStore

        RedisStore(configs["redis"].redis_url).clear()
    if "postgres" not in skipped:
        import sqlalchemy as sa

        from bulk.storage.postgres_store import connect

        engine = connect(configs["postgres"].database_url, 5.0)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{configs["postgres"].database_schema}" CASCADE'))
        engine.dispose()


def _render(model, length, runs, ttft, speedups, reads, sizes, skipped) -> str:
    rows = [["recompute", ttft["recompute"], None, None]]
    for t, x in speedups.items():
        rows.append([t, ttft[t], x, "PASS" if x >= TARGET_SPEEDUP else "MISS"])
    out = [
        format_table(
            ["prefix found in", "TTFT ms", "x faster", f">= {TARGET_SPEEDUP:.0f}x"],
            rows,
            f"TTFT, {length}-token prompt on {model} "
            f"(median of {runs} runs; ratio = median of per-run ratios)",
        )
    ]
    for t, why in skipped.items():
        out.append(f"{t}: skipped ({why})")
    if reads is not None:
        read_rows = [[w, v["ms"], v["mb_per_s"]] for w, v in reads.items() if isinstance(v, dict)]
        share = reads["share_of_raw_get"]
        verdict = "PASS" if share is not None and share >= TARGET_READ_SHARE else "MISS"
        out.append(format_table(["Redis read", "ms", "MB/s"], read_rows, f"\nReading {reads['bytes']} bytes"))
        out.append(f"tier get_many / raw GET loop throughput: {share:.2f}x  ({verdict}, target >= 0.70x)")
    size_rows = [[m, v["memory"], v["stored"], f"{v['ratio_vs_model_dtype']:.2f}x"] for m, v in sizes.items()]
    out.append(
        format_table(
            ["quantization", "memory B/token", "stored B/token", "vs model dtype"],
            size_rows,
            "\nBytes per token",
        )
    )
    return "\n".join(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())

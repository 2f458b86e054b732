"""Redis and PostgreSQL as shared tiers: a second engine process gets prefix hits from blocks the
first stored, with the same greedy output; a value altered in the backend is rejected."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from tests.storage.conftest import DATABASE_URL, PROMPT

CHILD = Path(__file__).with_name("engine_child.py")
REQUEST = {"query": PROMPT, "max_new_tokens": 8}


def _in_second_process(config: dict, request: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(CHILD), json.dumps(config), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["redis", "postgres"])
def tier(request, redis_url, pg_schema, cache_secret):
    """(config fields, tier name) for one shared backend."""
    if request.param == "redis":
        return {"redis_url": redis_url, "cache_secret": cache_secret}, "redis"
    return {
        "database_url": DATABASE_URL,
        "database_schema": pg_schema,
        "cache_secret": cache_secret,
    }, "postgres"


def test_second_process_reuses_blocks(tier, demo_model):
    fields, name = tier
    config = {"response_cache": False, **fields}
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(**config), model=demo_model) as first:
        cold = first.process_request_sync(REQUEST)
        assert first.flush_storage(10)
        assert first.get_stats()["tiers"][name]["writes"] >= cold["prompt_tokens"] // 16
    second = _in_second_process(config, REQUEST)
    assert second["result"]["cached_tokens"] >= cold["prompt_tokens"] - 16
    assert second["result"]["result"] == cold["result"]
    assert second["tiers"][name]["hits"] == second["result"]["cached_tokens"] // 16


def _tamper(name: str, fields: dict) -> int:
    """Flip one byte in the middle of every other stored block; returns how many were altered."""
    if name == "redis":
        import redis

        client = redis.Redis.from_url(fields["redis_url"])
        keys = sorted(client.scan_iter(match="bul:kv:v1:*"))
        for key in keys[::2]:
            value = bytearray(client.get(key))
            value[len(value) // 2] ^= 0x40
            client.set(key, bytes(value))
        client.close()
        return len(keys[::2])
    engine = sa.create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://"))
    table = f'"{fields["database_schema"]}".bul_kv_blocks'
    with engine.begin() as conn:
        keys = [k for (k,) in conn.execute(sa.text(f"SELECT key FROM {table} ORDER BY key"))][::2]
        flip = f"UPDATE {table} SET value = overlay(value placing '\\xff'::bytea from 200) WHERE key = :k"
        for key in keys:
            conn.execute(sa.text(flip), {"k": key})
    engine.dispose()
    return len(keys)


def test_altered_values_are_rejected_and_output_stays_correct(tier, demo_model):
    fields, name = tier
    config = KVCacheConfig(response_cache=False, **fields)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as first:
        cold = first.process_request_sync(REQUEST)
        first.flush_storage(10)
    assert _tamper(name, fields) > 0
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as second:  # empty memory tier
        warm = second.process_request_sync(REQUEST)
        stats = second.get_stats()["tiers"][name]
    assert warm["result"] == cold["result"]
    assert warm["cached_tokens"] < cold["prompt_tokens"] - 16
    assert stats["corrupt"] >= 1 and stats["errors"] == 0

"""The guide's adapters against the real Redis (database 12) and PostgreSQL (a schema of our own)."""

import time
import uuid

import pytest
import redis
import sqlalchemy as sa

from bulk.adapters import PostgresCacheAdapter, RedisCacheAdapter
from bulk.errors import TierError
from bulk.storage.postgres_store import connect
from tests.storage.conftest import DATABASE_URL

REDIS_URL = "redis://127.0.0.1:6379/12"
VALUES = [{"result": "plan", "cache_hit": False}, [1, 2, "x"], "text", 42, None, b"\x00raw\xff"]


@pytest.fixture
def redis_adapter():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    adapter = RedisCacheAdapter(REDIS_URL)
    yield adapter, client
    adapter.close()
    client.flushdb()
    client.close()


@pytest.fixture
def pg_adapter():
    schema = f"bul_test_{uuid.uuid4().hex[:10]}"
    adapter = PostgresCacheAdapter(DATABASE_URL, schema=schema)
    yield adapter, schema
    adapter.close()
    engine = connect(DATABASE_URL, 5.0)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def test_redis_round_trips_json_and_bytes_under_the_guide_prefix(redis_adapter):
    adapter, client = redis_adapter
    for i, value in enumerate(VALUES):
        adapter.set(f"k{i}", value)
    assert [adapter.get(f"k{i}") for i in range(len(VALUES))] == VALUES
    assert sorted(client.keys()) == sorted(f"kv_cache:k{i}".encode() for i in range(len(VALUES)))
    assert adapter.get("missing") is None
    adapter.delete("k0")
    assert adapter.get("k0") is None and adapter.get("k1") == VALUES[1]


def test_redis_ttl(redis_adapter):
    adapter, client = redis_adapter
    adapter.set("default", {"a": 1})
    assert 3590 <= client.ttl("kv_cache:default") <= 3600
    adapter.set("short", {"a": 1}, ttl=1)
    assert adapter.get("short") == {"a": 1}
    time.sleep(1.2)
    assert adapter.get("short") is None


def test_redis_clear_takes_only_the_prefix(redis_adapter):
    adapter, client = redis_adapter
    for i in range(1200):  # more than one SCAN batch
        adapter.set(f"k{i}", i)
    client.set("other:key", b"keep")
    adapter.clear()
    assert client.keys() == [b"other:key"]


def test_redis_refuses_non_json_values(redis_adapter):
    adapter, _ = redis_adapter
    with pytest.raises(TypeError):
        adapter.set("obj", object())


def test_redis_down_raises_our_error():
    adapter = RedisCacheAdapter("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(TierError, match="redis"):
        adapter.get("x")


def test_postgres_round_trip_and_guide_table(pg_adapter):
    adapter, schema = pg_adapter
    for i, value in enumerate(VALUES):
        adapter.set(f"k{i}", value)
    assert [adapter.get(f"k{i}") for i in range(len(VALUES))] == VALUES
    assert adapter.get("missing") is None
    adapter.set("k0", {"updated": True})
    assert adapter.get("k0") == {"updated": True}
    columns = sa.inspect(adapter.engine).get_columns("cache_entries", schema=schema)
    assert [c["name"] for c in columns] == ["key", "value", "created_at", "accessed_at"]


def test_postgres_get_touches_accessed_at(pg_adapter):
    adapter, schema = pg_adapter
    adapter.set("k", {"v": 1})
    query = sa.text(f'SELECT created_at, accessed_at FROM "{schema}".cache_entries WHERE key = :k')
    with adapter.engine.connect() as conn:
        created, accessed = conn.execute(query, {"k": "k"}).one()
    time.sleep(0.05)
    assert adapter.get("k") == {"v": 1}
    with adapter.engine.connect() as conn:
        created_after, accessed_after = conn.execute(query, {"k": "k"}).one()
    assert created_after == created and accessed_after > accessed


def test_stored_values_are_never_pickles(redis_adapter, pg_adapter):
    (adapter, client), (pg, schema) = redis_adapter, pg_adapter
    adapter.set("k", {"a": 1})
    pg.set("k", {"a": 1})
    with pg.engine.connect() as conn:
        stored = bytes(conn.execute(sa.text(f'SELECT value FROM "{schema}".cache_entries')).scalar_one())
    for raw in (client.get("kv_cache:k"), stored):
        assert raw == b'j{"a":1}'

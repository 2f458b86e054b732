"""A lower tier's size and budget follow what its backend really holds: after a Redis restart that
lost keys, when keys expire or another process deletes them, and for the rows PostgreSQL listed at
start. Real Redis servers and PostgreSQL; a fake backend only in the first, unit-level test."""

from __future__ import annotations

import threading
import time
import uuid

import redis
import sqlalchemy as sa

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import TierError
from bulk.storage.base import BlockStore
from bulk.storage.budget import BudgetedStore
from bulk.storage.guard import GuardedStore
from bulk.storage.postgres_store import connect
from bulk.storage.redis_store import BLOCK_PREFIX
from tests.helpers import wait_until
from tests.storage.conftest import DATABASE_URL, PROMPT
from tests.storage.test_faults import _free_port, _start_redis

REDIS_URL = "redis://127.0.0.1:6379/9"


class _Backend(BlockStore[bytes]):
    """A dict with the `sizes` a resync asks for; `on_sizes` runs before each answer."""

    name = "fake"

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.on_sizes = lambda: None

    def contains(self, key):
        return key in self.data

    def get_many(self, keys):
        return [self.data.get(k) for k in keys]

    def put_many(self, items):
        self.data.update(items)

    def delete(self, key):
        self.data.pop(key, None)

    def clear(self):
        self.data.clear()

    def sizes(self, keys):
        self.on_sizes()
        return [len(self.data[k]) if k in self.data else None for k in keys]


def test_resync_forgets_lost_keys_and_keeps_those_written_meanwhile():
    backend = _Backend()
    budget = BudgetedStore(backend, capacity_blocks=8, strategy="lru")
    budget.put_many([(bytes([i]), b"x" * 10) for i in range(6)])
    assert (len(budget), budget.size_bytes) == (6, 60)
    backend.data.pop(bytes([0]))
    backend.data.pop(bytes([1]))  # lost behind our back...
    backend.data[bytes([2])] = b"y" * 25  # ...or rewritten with another size

    def write_during_resync():
        backend.on_sizes = lambda: None
        budget.put_many([(bytes([3]), b"z" * 7)])  # the backend's answer for key 3 is now stale
        backend.data.pop(bytes([3]))  # ...and so would this be

    backend.on_sizes = write_during_resync
    assert budget.resync() == 2
    assert (len(budget), budget.size_bytes) == (4, 25 + 7 + 10 + 10)
    assert budget.resynced_away == 2
    # Room freed by forgotten keys is room: four more blocks fit without evicting anything.
    budget.put_many([(bytes([10 + i]), b"w") for i in range(4)])
    assert budget.evictions == 0 and len(budget) == 8


def test_a_tier_that_recovers_or_reconnects_is_due_for_a_resync():
    backend = _Backend()
    backend.connections_opened = 1
    guarded = GuardedStore(BudgetedStore(backend, capacity_blocks=4, strategy="lru"), retry_seconds=0.01)
    assert guarded.resync_due  # never resynchronised: the first connection counts
    guarded.resync()
    assert not guarded.resync_due
    backend.connections_opened = 2  # the client replaced a dead connection by itself
    assert guarded.resync_due
    guarded.resync()
    failing = backend.get_many
    backend.get_many = lambda keys: (_ for _ in ()).throw(TierError("down"))
    guarded.get_many([b"k"])
    assert not guarded.healthy and not guarded.resync_due
    backend.get_many = failing
    time.sleep(0.02)
    guarded.get_many([b"k"])  # the probe after the back-off succeeds: the tier is back
    assert guarded.healthy and guarded.resync_due
    guarded.resync()
    assert not guarded.resync_due


def _ask(engine: UltraAdaptiveKVCacheEngine, i: int) -> dict:
    return engine.process_request_sync({"query": f"{i}: {PROMPT}", "max_new_tokens": 2})


def _redis_figures(client: redis.Redis) -> tuple[int, int]:
    keys = list(client.scan_iter(BLOCK_PREFIX + "*"))
    return len(keys), sum(client.strlen(k) for k in keys)


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    """Whether `predicate` comes true within `timeout` (the callers assert it with their figures)."""
    try:
        wait_until(predicate, timeout)
    except AssertionError:
        return False
    return True


def test_after_a_redis_restart_that_lost_keys_the_reported_size_matches_the_server(cache_secret, demo_model):
    port = _free_port()
    servers = [_start_redis(port)]
    client = redis.Redis(port=port)
    config = KVCacheConfig(
        response_cache=False,
        redis_url=f"redis://127.0.0.1:{port}/0",
        cache_secret=cache_secret,
        tier_retry_seconds=0.1,
        tier_resync_seconds=3600,  # only the reconnect can trigger the resync this test waits for
    )
    try:
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
            for i in range(4):
                _ask(engine, i)
            assert engine.flush_storage(10)
            before = engine.get_stats()["tiers"]["redis"]
            assert (before["blocks"], before["size_bytes"]) == _redis_figures(client) and before["blocks"] > 0

            servers[0].kill()  # SIGKILL: no persistence, the restarted server is empty
            servers[0].wait()
            servers.append(_start_redis(port))
            i = 100
            while not engine.get_stats()["tiers"]["redis"]["healthy"] or _redis_figures(client)[0] == 0:
                _ask(engine, i)  # new prompts, written once the tier is retried and back
                engine.flush_storage(10)
                i += 1
                assert i < 200, "the Redis tier never came back"

            def matches() -> bool:
                tier = engine.get_stats()["tiers"]["redis"]
                return (tier["blocks"], tier["size_bytes"]) == _redis_figures(client)

            assert _wait_for(matches), (engine.get_stats()["tiers"]["redis"], _redis_figures(client))
            after = engine.get_stats()["tiers"]["redis"]
            # redis-py reconnected by itself (no failed call): the new connection triggered the resync.
            assert after["resynced_away"] >= before["blocks"]
            assert after["blocks"] < before["blocks"] + (i - 100) * 12  # not the sum of both lives
    finally:
        client.close()
        for server in servers:
            server.kill()
            server.wait()


def test_keys_expired_or_deleted_elsewhere_are_forgotten_periodically(cache_secret, demo_model):
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    config = KVCacheConfig(
        response_cache=False, redis_url=REDIS_URL, cache_secret=cache_secret, tier_resync_seconds=0.2
    )
    try:
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
            for i in range(3):
                _ask(engine, i)
            assert engine.flush_storage(10)
            keys = sorted(client.scan_iter(BLOCK_PREFIX + "*"))
            assert engine.get_stats()["tiers"]["redis"]["blocks"] == len(keys) > 2
            client.delete(*keys[::2])  # another replica's budget, or the TTL
            expected = _redis_figures(client)
            assert _wait_for(
                lambda: (
                    (
                        engine.get_stats()["tiers"]["redis"]["blocks"],
                        engine.get_stats()["tiers"]["redis"]["size_bytes"],
                    )
                    == expected
                )
            ), engine.get_stats()["tiers"]["redis"]
    finally:
        client.flushdb()
        client.close()


def test_postgres_rows_listed_at_start_get_their_sizes_and_deleted_rows_are_forgotten(
    cache_secret, demo_model
):
    schema = f"bul_resync_{uuid.uuid4().hex[:10]}"
    config = KVCacheConfig(
        response_cache=False,
        database_url=DATABASE_URL,
        database_schema=schema,
        cache_secret=cache_secret,
        tier_resync_seconds=0.2,
    )
    db = connect(DATABASE_URL, 5.0)
    table = f'"{schema}".bul_kv_blocks'

    def figures() -> tuple[int, int]:
        with db.begin() as conn:
            count, size = conn.execute(
                sa.text(f"SELECT count(*), coalesce(sum(octet_length(value)), 0) FROM {table}")
            ).one()
        return int(count), int(size)

    try:
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as first:
            for i in range(3):
                _ask(first, i)
            assert first.flush_storage(10)
        stored = figures()
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as second:
            second.warmup_sync()  # builds the tiers: the rows are listed, then resynchronised at once

            def tier() -> tuple[int, int]:
                stats = second.get_stats()["tiers"]["postgres"]
                return stats["blocks"], stats["size_bytes"]

            assert _wait_for(lambda: tier() == stored), (tier(), stored)
            with db.begin() as conn:
                conn.execute(sa.text(f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} LIMIT 5)"))
            assert _wait_for(lambda: tier() == figures()), (tier(), figures())
            assert second.get_stats()["tiers"]["postgres"]["resynced_away"] == 5
    finally:
        with db.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        db.dispose()


def test_a_resync_never_runs_on_the_request_path(cache_secret, demo_model, monkeypatch):
    """A slow backend answer to a resync must not hold a request up: it runs on the writer thread."""
    callers: list[str] = []
    original = BudgetedStore.resync

    def recording(self):
        callers.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(BudgetedStore, "resync", recording)
    config = KVCacheConfig(
        response_cache=False, redis_url=REDIS_URL, cache_secret=cache_secret, tier_resync_seconds=0.05
    )
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
            _ask(engine, 0)
            assert _wait_for(lambda: len(callers) >= 2)
        assert set(callers) == {"bul-tier-writer"}
    finally:
        client.flushdb()
        client.close()

"""A lower tier that fails never fails a request: a Redis server killed mid-stream, one frozen (every
call times out), PostgreSQL unreachable, a persistence path that cannot be created."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 5, message="redis-server to start")
    except AssertionError:
        proc.kill()
        raise
    return proc


@pytest.fixture
def redis_server():
    port = _free_port()
    servers = [_start_redis(port)]
    yield port, servers
    for proc in servers:
        proc.kill()
        proc.wait()


def _ask(engine, i):
    return engine.process_request_sync(
        {"query": f"request {i}: " + "shared context " * 12, "max_new_tokens": 2}
    )


def test_redis_killed_mid_stream_costs_no_request_and_comes_back(redis_server, cache_secret, demo_model):
    port, servers = redis_server
    config = KVCacheConfig(
        response_cache=False,
        cache_secret=cache_secret,
        redis_url=f"redis://127.0.0.1:{port}/0",
        tier_retry_seconds=0.1,
        tier_timeout=0.5,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        for i in range(3):
            _ask(engine, i)
        assert engine.flush_storage(10) and engine.get_stats()["tiers"]["redis"]["healthy"]
        servers[0].kill()
        servers[0].wait()
        results = [_ask(engine, i) for i in range(3, 8)]  # every one is answered
        engine.flush_storage(10)
        down = engine.get_stats()["tiers"]["redis"]
        assert all(r["completion_tokens"] == 2 for r in results)
        assert down["errors"] >= 1 and not down["healthy"]

        servers.append(_start_redis(port))

        def healthy_after_a_request() -> bool:
            # The tier is tried again on use, once its back-off has passed: keep using it.
            _ask(engine, 100 + int(time.monotonic() * 10))
            engine.flush_storage(10)
            return engine.get_stats()["tiers"]["redis"]["healthy"]

        wait_until(healthy_after_a_request, 10, 0.3, "the Redis tier to come back")
        up = engine.get_stats()["tiers"]["redis"]
        assert up["healthy"], up
        before = up["writes"]
        _ask(engine, 999)
        engine.flush_storage(10)
        assert engine.get_stats()["tiers"]["redis"]["writes"] > before
    assert redis.Redis(port=port).dbsize() > 0


def test_frozen_redis_times_out_instead_of_hanging(redis_server, cache_secret, demo_model):
    port, servers = redis_server
    config = KVCacheConfig(
        response_cache=False,
        redis_url=f"redis://127.0.0.1:{port}/0",
        tier_timeout=0.3,
        tier_retry_seconds=5,
        cache_secret=cache_secret,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        _ask(engine, 0)
        os.kill(servers[0].pid, signal.SIGSTOP)
        try:
            result = _ask(engine, 1)  # the read times out; the request is computed
            assert result["completion_tokens"] == 2
            assert engine.get_stats()["tiers"]["redis"]["errors"] >= 1
        finally:
            os.kill(servers[0].pid, signal.SIGCONT)


def test_unreachable_postgres_and_unusable_disk_path(tmp_path, cache_secret, demo_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = KVCacheConfig(
        response_cache=False,
        cache_secret=cache_secret,
        database_url=f"postgresql://postgres@127.0.0.1:{_free_port()}/test",
        enable_persistence=True,
        persistence_path=str(blocker / "kv"),
        tier_retry_seconds=0.1,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        first, second = _ask(engine, 0), _ask(engine, 0)
        engine.flush_storage(10)
        tiers = engine.get_stats()["tiers"]
    assert first["result"] == second["result"] and second["cached_tokens"] > 0  # memory still serves
    assert "disk" not in tiers  # could not be created: persistence off, logged
    assert tiers["postgres"]["errors"] >= 1 and not tiers["postgres"]["healthy"]

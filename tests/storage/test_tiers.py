"""The tiered read/write path: promotion into faster tiers, write-back on eviction of a block whose
write failed, budgets per tier, and the writer never blocking a request."""

from pathlib import Path

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from tests.storage.conftest import PROMPT
from tests.storage.test_faults import _free_port, _start_redis

REQUEST = {"query": PROMPT, "max_new_tokens": 4}


def test_a_block_found_in_redis_is_promoted_to_memory_and_disk(tmp_path, redis_url, cache_secret, demo_model):
    base = KVCacheConfig(response_cache=False, redis_url=redis_url, cache_secret=cache_secret)
    with UltraAdaptiveKVCacheEngine(base, model=demo_model) as first:
        cold = first.process_request_sync(REQUEST)
    both = base.replace(enable_persistence=True, persistence_path=str(tmp_path))
    with UltraAdaptiveKVCacheEngine(both, model=demo_model) as second:
        warm = second.process_request_sync(REQUEST)
        second.flush_storage(10)
        tiers = second.get_stats()["tiers"]
        again = second.process_request_sync(REQUEST)  # now from memory
    blocks = warm["cached_tokens"] // 16
    assert warm["result"] == cold["result"] == again["result"] and blocks > 0
    assert tiers["disk"]["hits"] == 0 and tiers["redis"]["hits"] == blocks
    assert tiers["disk"]["writes"] >= blocks  # promoted into the faster lower tier
    assert len(list(Path(tmp_path).glob("*/*.blk"))) >= blocks
    with UltraAdaptiveKVCacheEngine(both, model=demo_model) as third:
        third.process_request_sync(REQUEST)
        assert third.get_stats()["tiers"]["disk"]["hits"] == blocks  # disk answers before Redis


def test_a_block_whose_write_failed_is_written_when_memory_evicts_it(cache_secret, demo_model):
    port = _free_port()
    config = KVCacheConfig(
        response_cache=False,
        redis_url=f"redis://127.0.0.1:{port}/0",
        max_tokens=256,
        tier_retry_seconds=0.05,
        cache_secret=cache_secret,
    )
    server = None
    try:
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
            cold = engine.process_request_sync(REQUEST)  # Redis is not running: every write fails
            engine.flush_storage(10)
            assert engine.get_stats()["tiers"]["redis"]["writes"] == 0
            server = _start_redis(port)
            for i in range(6):  # other prompts push the first prompt's blocks out of memory
                engine.process_request_sync({"query": f"{i} other text " * 20, "max_new_tokens": 1})
            assert engine.get_stats()["tiers"]["memory"]["evictions"] > 0
        # Only the eviction could have written the first prompt's blocks: a fresh engine finds them.
        with UltraAdaptiveKVCacheEngine(config, model=demo_model) as fresh:
            warm = fresh.process_request_sync(REQUEST)
        assert warm["cached_tokens"] > 0 and warm["result"] == cold["result"]
    finally:
        if server is not None:
            server.kill()
            server.wait()

"""The local-disk tier: atomic files, an index rebuilt at start, corrupt files removed, and an
engine that finds its blocks again after a restart."""

from pathlib import Path

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.storage.disk import DiskBlockStore
from tests.storage.conftest import PROMPT


def test_put_get_and_index_rebuilt(tmp_path):
    store = DiskBlockStore(tmp_path)
    keys = [bytes([i]) * 32 for i in range(5)]
    store.put_many((k, k * 3) for k in keys)
    assert store.get_many(keys) == [k * 3 for k in keys]
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "leftover.blk.123-4.tmp").write_bytes(b"half a write")
    again = DiskBlockStore(tmp_path)
    assert again.keys() == keys and again.size_bytes == 5 * 96
    assert not list(tmp_path.glob("*/*.tmp")), "unfinished writes are removed at start"
    again.delete(keys[0])
    assert again.get(keys[0]) is None and not again.contains(keys[0])
    assert not any(p.name.startswith(keys[0].hex()) for p in tmp_path.glob("*/*"))


def _engine(path, demo_model, **kw):
    config = KVCacheConfig(enable_persistence=True, persistence_path=str(path), response_cache=False, **kw)
    return UltraAdaptiveKVCacheEngine(config, model=demo_model)


def test_restarted_engine_hits_disk(tmp_path, demo_model):
    request = {"query": PROMPT, "max_new_tokens": 8}
    with _engine(tmp_path, demo_model) as first:
        cold = first.process_request_sync(request)
    assert cold["cached_tokens"] == 0
    with _engine(tmp_path, demo_model) as second:
        warm = second.process_request_sync(request)
        disk = second.get_stats()["tiers"]["disk"]
    assert warm["cached_tokens"] >= warm["prompt_tokens"] - 16
    assert warm["result"] == cold["result"]
    assert disk["hits"] == warm["cached_tokens"] // 16 and disk["errors"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_file_is_skipped_removed_and_output_correct(tmp_path, demo_model, damage):
    request = {"query": PROMPT, "max_new_tokens": 8}
    with _engine(tmp_path, demo_model) as first:
        cold = first.process_request_sync(request)
    files = sorted(Path(tmp_path).glob("*/*.blk"), key=lambda p: p.stat().st_mtime)
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    damaged = bytes(data[: len(data) // 2] if damage == "truncate" else b"" if damage == "empty" else data)
    victim.write_bytes(damaged)
    with _engine(tmp_path, demo_model) as second:
        warm = second.process_request_sync(request)
        disk = second.get_stats()["tiers"]["disk"]
    assert warm["result"] == cold["result"]
    assert 0 < warm["cached_tokens"] < cold["prompt_tokens"] - 16  # the chain ends at the bad block
    assert disk["corrupt"] >= 1
    assert not victim.exists() or victim.read_bytes() != damaged  # removed (or rewritten whole)


def test_disk_budget_evicts(tmp_path, demo_model):
    with _engine(tmp_path, demo_model, persistence_max_tokens=64) as engine:
        engine.process_request_sync({"query": PROMPT, "max_new_tokens": 4})
        engine.flush_storage(10)
        disk = engine.get_stats()["tiers"]["disk"]
    assert disk["blocks"] <= 4 and disk["evictions"] > 0
    assert len(list(Path(tmp_path).glob("*/*.blk"))) <= 4

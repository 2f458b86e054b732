"""Shared tiers are signed by default: a Redis or PostgreSQL tier needs a secret, a block forged under a
recomputed plain SHA-256 tag is refused, the unsigned opt-out is explicit and logged, and rotating the
secret turns old blocks into misses, never errors. Real Redis (database 9) and PostgreSQL (a schema
of our own)."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis
import sqlalchemy as sa
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine_settings import EngineSettings
from bulk.errors import InvalidConfigError
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from bulk.storage.postgres_store import PostgresTable, connect
from bulk.storage.redis_store import BLOCK_PREFIX, RedisStore
from bulk.storage.serialization import BlockRecord, dumps, loads
from tests.storage.conftest import DATABASE_URL, PROMPT

REDIS_URL = "redis://127.0.0.1:6379/9"
REQUEST = {"query": PROMPT, "max_new_tokens": 8}


@pytest.fixture
def redis9():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def schema():
    name = f"bul_signed_{uuid.uuid4().hex[:10]}"
    yield name
    engine = connect(DATABASE_URL, 5.0)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["redis", "postgres"])
def shared(request, redis9, schema):
    """(config fields without a secret, tier name) for one shared backend."""
    if request.param == "redis":
        return {"redis_url": redis9}, "redis"
    return {"database_url": DATABASE_URL, "database_schema": schema}, "postgres"


@pytest.fixture
def no_secret_in_env(monkeypatch):
    monkeypatch.delenv("BUL_CACHE_SECRET", raising=False)
    monkeypatch.delenv("BUL_ALLOW_UNSIGNED_SHARED_TIERS", raising=False)


def _store(fields: dict):
    if "redis_url" in fields:
        return RedisStore(fields["redis_url"])
    return PostgresTable(fields["database_url"], schema=fields["database_schema"])


def _stored_keys(store) -> list[bytes]:
    if isinstance(store, RedisStore):
        return [
            bytes.fromhex(k.decode().removeprefix(BLOCK_PREFIX))
            for k in store.client.scan_iter(BLOCK_PREFIX + "*")
        ]
    return store.keys()


def _forge(fields: dict, secret: bytes | None) -> int:
    """What an attacker with write access does: replace every stored block by noise with the same
    header (tokens, shape, dtype), under a freshly computed plain SHA-256 tag. Returns the count."""
    store = _store(fields)
    try:
        keys = _stored_keys(store)
        forged = []
        for key, data in zip(keys, store.get_many(keys), strict=True):
            record = loads(key, data, secret)
            noise = {name: torch.randn(t.shape).to(t.dtype) for name, t in record.parts.items()}
            fake = BlockRecord(record.tokens, record.quantization, record.dtype, record.shape, noise)
            forged.append((key, dumps(key, fake, None)))
        store.put_many(forged)
        return len(forged)
    finally:
        store.close()


def test_a_shared_tier_without_a_secret_is_a_configuration_error(
    shared, no_secret_in_env, tmp_path, monkeypatch
):
    fields, _ = shared
    with pytest.raises(InvalidConfigError) as refused:
        KVCacheConfig(**fields)
    assert refused.value.key == "cache_secret"
    assert "BUL_CACHE_SECRET" in str(refused.value) and "secrets.token_hex" in str(refused.value)
    assert "BUL_ALLOW_UNSIGNED_SHARED_TIERS" in str(refused.value)
    # The services read the same rule from the environment and name the variable to set.
    for name, value in fields.items():
        monkeypatch.setenv(f"BUL_{name.upper()}", value)
    with pytest.raises(InvalidConfigError) as from_env:
        EngineSettings().engine_config()
    assert from_env.value.key == "BUL_CACHE_SECRET"
    with pytest.raises(InvalidConfigError, match="BUL_CACHE_SECRET"):
        create_app(ServerSettings())  # `bul serve` stops before binding a port
    # The opt-out is a BUL_* variable of every service too.
    monkeypatch.setenv("BUL_ALLOW_UNSIGNED_SHARED_TIERS", "true")
    assert EngineSettings().engine_config().allow_unsigned_shared_tiers is True
    assert ServerSettings().engine_config().signing_secret() is None
    monkeypatch.delenv("BUL_ALLOW_UNSIGNED_SHARED_TIERS")
    # The variable alone is enough, and the local disk tier needs no secret at all.
    monkeypatch.setenv("BUL_CACHE_SECRET", "from-the-environment")
    assert KVCacheConfig(**fields).signing_secret() == b"from-the-environment"
    monkeypatch.delenv("BUL_CACHE_SECRET")
    disk = KVCacheConfig(enable_persistence=True, persistence_path=str(tmp_path))
    assert disk.signing_secret() is None and disk.shared_tiers == []


def test_a_forged_block_under_a_plain_tag_is_refused_by_default(shared, cache_secret, demo_model):
    fields, name = shared
    config = KVCacheConfig(response_cache=False, cache_secret=cache_secret, **fields)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as first:
        cold = first.process_request_sync(REQUEST)
        assert first.flush_storage(10)
        assert first.get_stats()["config"]["block_tag"] == "hmac-sha256"
        assert first.get_stats()["config"]["unsigned_shared_tiers"] is False
    assert _forge(fields, cache_secret.encode()) >= cold["prompt_tokens"] // 16
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as second:  # empty memory tier
        warm = second.process_request_sync(REQUEST)
        stats = second.get_stats()["tiers"][name]
    assert warm["cached_tokens"] == 0 and warm["result"] == cold["result"]
    assert stats["corrupt"] >= 1 and stats["hits"] == 0 and stats["errors"] == 0


def test_the_unsigned_opt_out_is_explicit_and_logged(shared, no_secret_in_env, demo_model, caplog):
    fields, name = shared
    config = KVCacheConfig(response_cache=False, allow_unsigned_shared_tiers=True, **fields)
    with (
        caplog.at_level(logging.WARNING, logger="bulk.storage.factory"),
        UltraAdaptiveKVCacheEngine(config, model=demo_model) as first,
    ):
        cold = first.process_request_sync(REQUEST)
        assert first.flush_storage(10)
        assert first.get_stats()["config"]["block_tag"] == "sha256"
        assert first.get_stats()["config"]["unsigned_shared_tiers"] is True
    assert "allow_unsigned_shared_tiers" in caplog.text and name in caplog.text
    # What the opt-out costs: forged noise under a plain tag is served as if it were the prompt's KV.
    assert _forge(fields, None) > 0
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as second:
        forged = second.process_request_sync(REQUEST)
        stats = second.get_stats()["tiers"][name]
    assert forged["cached_tokens"] >= cold["prompt_tokens"] - 16 and stats["corrupt"] == 0


def test_rotating_the_secret_turns_old_blocks_into_misses_never_errors(shared, demo_model):
    fields, name = shared
    base = {"response_cache": False, **fields}
    old = KVCacheConfig(cache_secret="the-old-secret", **base)
    new = KVCacheConfig(cache_secret="the-new-secret", **base)
    with UltraAdaptiveKVCacheEngine(old, model=demo_model) as first:
        cold = first.process_request_sync(REQUEST)
        assert first.flush_storage(10)
    with UltraAdaptiveKVCacheEngine(new, model=demo_model) as rotated:
        after = rotated.process_request_sync(REQUEST)
        assert rotated.flush_storage(10)
        stats = rotated.get_stats()
    assert after["result"] == cold["result"] and after["cached_tokens"] == 0
    assert stats["errors"] == 0 and stats["tiers"][name]["errors"] == 0
    assert stats["tiers"][name]["corrupt"] == 1  # the first old block met ends the chain, deleted
    # The rotated engine stored the prefix again under the new key: the next replica reuses it.
    with UltraAdaptiveKVCacheEngine(new, model=demo_model) as later:
        again = later.process_request_sync(REQUEST)
    assert again["cached_tokens"] >= cold["prompt_tokens"] - 16 and again["result"] == cold["result"]

"""`BUL_<FIELD>` variables: one per `KVCacheConfig` field, shared by every service."""

import dataclasses

import pytest

from bulk.config import CacheStrategy, KVCacheConfig
from bulk.engine_settings import EngineSettings
from bulk.errors import InvalidConfigError


def test_every_config_field_is_a_variable_with_the_same_default(monkeypatch):
    for field in dataclasses.fields(KVCacheConfig):
        monkeypatch.delenv(f"BUL_{field.name.upper()}", raising=False)
    assert EngineSettings().engine_config() == KVCacheConfig()


def test_variables_reach_the_config_and_flags_win(monkeypatch):
    monkeypatch.setenv("BUL_MAX_TOKENS", "4096")
    monkeypatch.setenv("BUL_CACHE_STRATEGY", "LFU")
    monkeypatch.setenv("BUL_REDIS_URL", "")  # empty: not set
    monkeypatch.setenv("BUL_ENABLE_PERSISTENCE", "true")
    monkeypatch.setenv("BUL_MODEL", "demo-large")
    config = EngineSettings().engine_config(model="demo", block_size=None)
    assert config.max_tokens == 4096 and config.cache_strategy is CacheStrategy.LFU
    assert config.redis_url is None and config.enable_persistence is True
    assert config.model == "demo" and config.block_size == 16


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("BUL_QUANTIZATION", "int3")
    with pytest.raises(InvalidConfigError) as info:
        EngineSettings().engine_config()
    assert info.value.key == "BUL_QUANTIZATION"

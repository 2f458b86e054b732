from __future__ import annotations

import dataclasses

import pytest

from bulk import named_models as registry
from bulk.config import CacheStrategy, KVCacheConfig
from bulk.errors import InvalidConfigError


def test_the_guides_django_settings_dict():
    config = KVCacheConfig(
        **{
            "max_tokens": 8192,
            "cache_strategy": "adaptive",
            "enable_persistence": True,
            "persistence_path": "/data/cache",
        }
    )
    assert config.cache_strategy is CacheStrategy.ADAPTIVE and config.enable_persistence


def test_defaults():
    config = KVCacheConfig()
    assert (config.max_tokens, config.cache_strategy, config.block_size) == (8192, CacheStrategy.ADAPTIVE, 16)
    assert config.max_blocks == 512
    assert config.system_prompt is None and config.model_cache_path == "~/.cache/bul/models"


def test_the_default_model_is_the_real_one_when_installed_else_the_demo(monkeypatch):
    # `make test` installs the real model's wheel, so the plain default is the real model here.
    assert registry.is_installed(registry.SMOLLM2_135M)
    assert KVCacheConfig().model == KVCacheConfig(model="auto").model == "smollm2-135m"
    # Without the wheel (a package name that is not installed), `auto` is the demo model.
    missing = dataclasses.replace(registry.SMOLLM2_135M, package="bul_no_such_package_for_tests")
    monkeypatch.setattr(registry, "DEFAULT_NAMED_MODEL", missing)
    assert KVCacheConfig().model == "demo"
    # A model named explicitly is kept as it is.
    assert KVCacheConfig(model="demo-large").model == "demo-large"


@pytest.mark.parametrize("strategy", ["lru", "LFU", "Adaptive", CacheStrategy.LRU])
def test_strategies_as_strings_or_members(strategy):
    assert isinstance(KVCacheConfig(cache_strategy=strategy).cache_strategy, CacheStrategy)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"max_token": 10}, "max_token"),
        ({"cache_strategy": "fifo"}, "cache_strategy"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "8192"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"block_size": 0}, "block_size"),
        ({"max_tokens": 8, "block_size": 16}, "max_tokens"),
        ({"quantization": "int3"}, "quantization"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "float64"}, "dtype"),
        ({"enable_persistence": "yes"}, "enable_persistence"),
        ({"redis_url": "localhost"}, "redis_url"),
        ({"model": ""}, "model"),
        ({"model_cache_path": ""}, "model_cache_path"),
        ({"system_prompt": ""}, "system_prompt"),
        ({"system_prompt": 3}, "system_prompt"),
        ({"response_cache_ttl": -1}, "response_cache_ttl"),
    ],
)
def test_bad_keys_and_values_raise_value_error_naming_the_key(settings, key):
    with pytest.raises(ValueError) as info:
        KVCacheConfig(**settings)
    assert isinstance(info.value, InvalidConfigError) and info.value.key == key
    assert str(info.value).startswith(key)


def test_config_is_frozen_and_replaceable():
    config = KVCacheConfig()
    with pytest.raises(AttributeError):
        config.max_tokens = 1  # type: ignore[misc]
    assert config.replace(max_tokens=64).max_tokens == 64

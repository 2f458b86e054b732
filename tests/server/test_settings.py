"""`bul serve` settings: every option a BUL_* variable, every engine option included, flags win."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from pydantic import ValidationError

from bulk.config import KVCacheConfig
from bulk.errors import InvalidConfigError
from bulk.server import cli
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings


def test_every_engine_option_is_a_setting():
    fields = set(ServerSettings.model_fields)
    assert {f.name for f in dataclasses.fields(KVCacheConfig)} <= fields
    assert {"host", "port", "api_keys", "rate_limit_per_minute", "max_body_bytes", "celery"} <= fields
    assert ServerSettings().port == 8002


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("BUL_PORT", "9100")
    monkeypatch.setenv("BUL_API_KEYS", "one, two")
    monkeypatch.setenv("BUL_MAX_TOKENS", "4096")
    monkeypatch.setenv("BUL_CACHE_STRATEGY", "lru")
    monkeypatch.setenv("BUL_REDIS_URL", "")
    settings = ServerSettings(port=9200)  # a flag wins over the environment
    assert settings.port == 9200 and settings.api_keys == ["one", "two"] and settings.redis_url is None
    config = settings.engine_config()
    assert config.max_tokens == 4096 and config.cache_strategy.value == "lru"


def test_bad_values_name_the_option(monkeypatch):
    with pytest.raises(InvalidConfigError, match="cache_strategy"):
        create_app(ServerSettings(cache_strategy="fifo"))
    monkeypatch.setenv("BUL_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        ServerSettings()


def test_cli_flags():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "8123", "--model", "demo-large", "--api-key", "k"])
    assert (args.port, args.model, args.api_keys, args.host) == (8123, "demo-large", ["k"], None)
    assert cli.run(parser.parse_args(["--model", "demo", "--port", "-5"])) == 2

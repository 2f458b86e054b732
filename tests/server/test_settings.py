"""`bul serve` settings: every option a BUL_* variable, every engine option included, flags win."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bulk.cluster.settings import ClusterSettings
from bulk.config import KVCacheConfig
from bulk.engine_settings import EngineSettings
from bulk.errors import InvalidConfigError
from bulk.grpc_service.settings import GrpcSettings
from bulk.integrations.celery.settings import CelerySettings
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


def test_bad_values_name_the_variable(monkeypatch):
    with pytest.raises(InvalidConfigError, match=r"^BUL_CACHE_STRATEGY: "):
        create_app(ServerSettings(cache_strategy="fifo"))
    monkeypatch.setenv("BUL_PORT", "not-a-port")
    with pytest.raises(InvalidConfigError, match=r"^BUL_PORT: ") as info:
        ServerSettings()
    assert info.value.key == "BUL_PORT" and isinstance(info.value, ValueError)


def test_every_service_says_a_bad_value_alike(monkeypatch):
    """One generator, one error style: the same bad engine value is the same message from `bul serve`'s
    settings, the shared engine settings (`bul grpc`, `bul worker`, the cluster's replicas) and
    `bul grpc`'s own, each naming the variable."""
    monkeypatch.setenv("BUL_MAX_TOKENS", "0")
    messages = set()
    for settings in (ServerSettings(), EngineSettings()):
        with pytest.raises(InvalidConfigError) as info:
            settings.engine_config()
        messages.add(str(info.value))
    assert messages == {"BUL_MAX_TOKENS: must be >= 1, got 0"}
    monkeypatch.setenv("BUL_GRPC_PORT", "70000")
    monkeypatch.setenv("BUL_RAY_REPLICAS", "0")
    monkeypatch.setenv("BUL_RESULT_EXPIRES", "soon")
    for cls, variable in (
        (GrpcSettings, "BUL_GRPC_PORT"),
        (ClusterSettings, "BUL_RAY_REPLICAS"),
        (CelerySettings, "BUL_RESULT_EXPIRES"),
    ):
        with pytest.raises(InvalidConfigError, match=f"^{variable}: "):
            cls()


def test_cli_flags():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "8123", "--model", "demo-large", "--api-key", "k"])
    assert (args.port, args.model, args.api_keys, args.host) == (8123, "demo-large", ["k"], None)
    assert cli.run(parser.parse_args(["--model", "demo", "--port", "-5"])) == 2

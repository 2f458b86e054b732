"""`cache_secret` is a secret type: it never shows in a repr, a str, a log line, a settings dump or
`/api/stats`, however it was set (constructor, `BUL_CACHE_SECRET`, pydantic's `SecretStr`, the Django
and Flask settings dicts), and stored blocks signed with it still verify under another configuration
with the same secret (and are refused under a different one)."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import requests
from pydantic import SecretStr

from bulk.config import SECRET_MASK, KVCacheConfig, Secret
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine_settings import EngineSettings
from bulk.errors import InvalidConfigError
from bulk.integrations.flask import _config as flask_config
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from tests.server.conftest import ENGINE, wait_ready
from tests.server.live_server import LiveServer

SECRET = "s3cr3t-never-to-be-seen-4f9a"
PROMPT = "Signed blocks: a prompt long enough to fill a few blocks of the cache, " * 3


def _shows_nothing(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


def test_the_config_keeps_a_plain_str_as_a_masked_secret():
    config = KVCacheConfig(model="demo", cache_secret=SECRET)
    assert isinstance(config.cache_secret, Secret)
    assert config.cache_secret.get_secret_value() == SECRET
    assert config.signing_secret() == SECRET.encode()
    secret = config.cache_secret
    _shows_nothing(repr(config), str(config), f"{config}", repr(secret), str(secret), f"{secret:>20}")
    assert str(secret) == SECRET_MASK and "cache_secret=Secret('**********')" in repr(config)
    # Copies, replacements and dumps keep the secret (and keep it masked).
    assert copy.deepcopy(config) == config == KVCacheConfig(model="demo", cache_secret=SECRET)
    assert config.replace(max_tokens=4096).signing_secret() == SECRET.encode()
    _shows_nothing(repr(dataclasses.asdict(config)))
    assert config != KVCacheConfig(model="demo", cache_secret="another one")
    with pytest.raises(AttributeError):
        secret._value = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    "given", [SECRET, Secret(SECRET), SecretStr(SECRET)], ids=["str", "Secret", "pydantic SecretStr"]
)
def test_every_kind_of_value_is_accepted(given):
    assert KVCacheConfig(model="demo", cache_secret=given).signing_secret() == SECRET.encode()
    # The Django and Flask integrations pass their settings dict to the constructor as it is.
    assert flask_config({"model": "demo", "cache_secret": given}).signing_secret() == SECRET.encode()


@pytest.mark.parametrize("bad", ["", 42, Secret(""), b"bytes"])
def test_a_bad_value_is_refused_without_quoting_it(bad):
    with pytest.raises(InvalidConfigError) as refused:
        KVCacheConfig(model="demo", cache_secret=bad)
    assert refused.value.key == "cache_secret" and "42" not in str(refused.value)


def test_the_environment_and_the_settings_classes_keep_it_masked(monkeypatch):
    monkeypatch.setenv("BUL_CACHE_SECRET", SECRET)
    for settings in (ServerSettings(model="demo"), EngineSettings(model="demo")):
        assert isinstance(settings.cache_secret, SecretStr)
        _shows_nothing(repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump()))
        config = settings.engine_config()
        assert isinstance(config.cache_secret, Secret) and config.signing_secret() == SECRET.encode()
        _shows_nothing(repr(config))
    # Empty means unset, as for every optional variable; the config then falls back to the variable.
    monkeypatch.setenv("BUL_CACHE_SECRET", "")
    assert ServerSettings(model="demo").cache_secret is None
    monkeypatch.setenv("BUL_CACHE_SECRET", SECRET)
    assert KVCacheConfig(model="demo").cache_secret is None
    assert KVCacheConfig(model="demo").signing_secret() == SECRET.encode()


def test_a_log_line_of_the_config_or_settings_shows_no_secret(monkeypatch, caplog):
    monkeypatch.setenv("BUL_CACHE_SECRET", SECRET)
    settings = ServerSettings(model="demo")
    config = KVCacheConfig(model="demo", cache_secret=SECRET)
    log = logging.getLogger("bulk.tests.secret")
    with caplog.at_level(logging.INFO, logger="bulk.tests.secret"):
        log.info("config %s / %r, settings %s / %r", config, config, settings, settings)
        log.info(
            "secret %s / %r, the engine's %s",
            config.cache_secret,
            config.cache_secret,
            settings.engine_config(),
        )
    assert len(caplog.records) == 2
    _shows_nothing(caplog.text, *(r.getMessage() for r in caplog.records))


def test_api_stats_shows_no_secret(tmp_path, monkeypatch, demo_model):
    # The full path of `bul serve`: BUL_CACHE_SECRET -> ServerSettings -> the engine's config; a disk
    # tier, so that blocks are really signed with it.
    monkeypatch.setenv("BUL_CACHE_SECRET", SECRET)
    disk = {"enable_persistence": True, "persistence_path": str(tmp_path), "response_cache": False}
    settings = ServerSettings(**ENGINE, **disk)
    engine = UltraAdaptiveKVCacheEngine(settings.engine_config(), model=demo_model)
    try:
        with LiveServer(create_app(settings, engine=engine)) as live:
            wait_ready(live.url)
            answer = requests.post(f"{live.url}/api/query", json={"query": PROMPT}, timeout=60)
            assert answer.status_code == 200
            stats = requests.get(f"{live.url}/api/stats", timeout=10)
            assert stats.status_code == 200 and stats.json()["config"]["block_tag"] == "hmac-sha256"
            pages = [stats.text]
            for path in ("/metrics", "/openapi.json", "/health", "/v1/models"):
                pages.append(requests.get(f"{live.url}{path}", timeout=10).text)
    finally:
        engine.shutdown()
    _shows_nothing(*pages)


def test_blocks_signed_with_the_secret_verify_under_another_config_with_the_same_secret(
    tmp_path, monkeypatch, demo_model
):
    base = {"model": "demo", "device": "cpu", "response_cache": False, "enable_persistence": True}
    base["persistence_path"] = str(tmp_path)
    request = {"query": PROMPT, "max_new_tokens": 4}
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(**base, cache_secret=SECRET), model=demo_model) as first:
        cold = first.process_request_sync(request)
        assert first.flush_storage(10)
    # The same secret, set the other way (BUL_CACHE_SECRET through the settings, a `SecretStr`): the
    # blocks on disk verify and are reused.
    monkeypatch.setenv("BUL_CACHE_SECRET", SECRET)
    same = EngineSettings(**base).engine_config()
    with UltraAdaptiveKVCacheEngine(same, model=demo_model) as second:
        warm = second.process_request_sync(request)
        disk = second.get_stats()["tiers"]["disk"]
    assert warm["result"] == cold["result"]
    assert warm["cached_tokens"] >= cold["prompt_tokens"] - 16 > 0
    assert disk["hits"] > 0 and disk["corrupt"] == 0
    # Another secret: the same blocks fail their check and are recomputed, never used.
    other = KVCacheConfig(**base, cache_secret="a different secret")
    with UltraAdaptiveKVCacheEngine(other, model=demo_model) as third:
        refused = third.process_request_sync(request)
        disk = third.get_stats()["tiers"]["disk"]
    assert refused["result"] == cold["result"] and refused["cached_tokens"] == 0
    assert disk["corrupt"] >= 1 and disk["hits"] == 0

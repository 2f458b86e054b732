"""Servers for the API tests: uvicorn on a free port, serving engines built on the shared demo model."""

from __future__ import annotations

import pytest
import requests

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from tests.helpers import wait_until
from tests.server.live_server import LiveServer

ENGINE = {"model": "demo", "device": "cpu", "default_max_new_tokens": 4, "max_new_tokens_limit": 8}


def settings(**overrides) -> ServerSettings:
    return ServerSettings(**{**ENGINE, **overrides})


def wait_ready(url: str, timeout: float = 60) -> None:
    wait_until(
        lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, timeout, message="/health"
    )


@pytest.fixture(scope="session")
def api_engine(demo_model):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=demo_model)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(api_engine):
    """The default configuration: no keys, no rate limit."""
    with LiveServer(create_app(settings(max_body_bytes=16384), engine=api_engine)) as live:
        wait_ready(live.url)
        yield live


# Room for whole JSON objects and tool calls (the default server's 8 new tokens hold none).
ROOMY = {"default_max_new_tokens": 64, "max_new_tokens_limit": 600, "response_cache": False}


@pytest.fixture(scope="session")
def roomy_server(demo_model):
    """A server whose requests may ask for up to 600 new tokens, response cache off (structured
    outputs and tool calls: every answer from the model, long enough to finish)."""
    with (
        UltraAdaptiveKVCacheEngine(KVCacheConfig(**{**ENGINE, **ROOMY}), model=demo_model) as engine,
        LiveServer(create_app(settings(**ROOMY), engine=engine)) as live,
    ):
        wait_ready(live.url)
        yield live


@pytest.fixture(scope="session")
def protected_server(api_engine):
    """API keys on, and a rate limit of 3 requests at once then 1 a minute per key."""
    app = create_app(
        settings(api_keys=["key-one", "key-two"], rate_limit_per_minute=1, rate_limit_burst=3),
        engine=api_engine,
    )
    with LiveServer(app) as live:
        wait_ready(live.url)
        yield live

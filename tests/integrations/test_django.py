"""The Django app through Django's test clients: the sync client (WSGI handler, which runs the async view
through async_to_sync) and the async client (ASGI handler)."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.test import AsyncClient, Client

from bulk.integrations.django import get_engine

GUIDE_FIELDS = {"result", "cache_hit", "latency"}


@pytest.fixture(autouse=True)
def _django(django_settings):
    return django_settings


def test_ready_builds_one_engine_from_settings_even_if_run_twice(django_settings):
    engine = get_engine()
    assert engine.config.max_tokens == django_settings.BUL_CACHE_CONFIG["max_tokens"] == 8192
    assert engine.config.enable_persistence is True
    assert engine.config.cache_strategy == "adaptive"
    apps.get_app_config("bul").ready()
    assert get_engine() is engine


def test_sync_client_wsgi():
    client = Client()
    response = client.post("/api/query", {"query": "Hello Django", "max_new_tokens": 4}, "application/json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) >= GUIDE_FIELDS
    assert body["completion_tokens"] == 4 and body["model"] == "demo"
    stats = client.get("/api/stats").json()
    assert stats["requests"] >= 1


async def test_async_client_asgi():
    client = AsyncClient()
    query = {"query": "Hello async Django", "max_new_tokens": 4}
    response = await client.post("/api/query", query, "application/json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) >= GUIDE_FIELDS
    again = (await client.post("/api/query", query, "application/json")).json()
    assert again["cache_hit"] is True and again["result"] == body["result"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "x", "priority": "high"}, "priority"),
        ({"text": "x", "query": "y"}, "query"),
        ({"query": "x", "temperature": -3}, "temperature"),
        ([1], "body"),
        ("{not json", "body"),
    ],
)
def test_bad_input_is_422_naming_the_field(payload, field):
    response = Client().post("/api/query", payload, "application/json")
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field}:")


async def test_bad_input_is_422_under_asgi_too():
    response = await AsyncClient().post("/api/query", {"query": 7}, "application/json")
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query"


def test_get_is_405():
    assert Client().get("/api/query").status_code == 405

"""The Flask extension through Flask's test client, with the engine built from app.config."""

from __future__ import annotations

import pytest
from flask import Flask

from bulk.integrations.flask import BUL

GUIDE_FIELDS = {"result", "cache_hit", "latency"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = Flask(__name__)
    app.config["BUL_CACHE_CONFIG"] = {
        "max_tokens": 8192,
        "cache_strategy": "adaptive",
        "model": "demo",
        "device": "cpu",
        "persistence_path": str(tmp_path_factory.mktemp("flask-kv")),
        "default_max_new_tokens": 4,
    }
    BUL().init_app(app)
    yield app
    BUL.engine(app).shutdown()


@pytest.fixture
def client(app):
    return app.test_client()


def test_init_app_warms_the_engine_and_keeps_it_in_extensions(app):
    engine = app.extensions["bul"]
    assert engine.ready  # warmed up in init_app, before any request
    assert engine.config.default_max_new_tokens == 4
    BUL(app)  # a second init is a no-op: still one engine
    assert app.extensions["bul"] is engine


def test_query_returns_the_guide_fields(client):
    response = client.post("/api/query", json={"query": "Hello Flask", "priority": 1})
    assert response.status_code == 200, response.text
    body = response.get_json()
    assert set(body) >= GUIDE_FIELDS
    assert body["completion_tokens"] == 4 and body["model"] == "demo"
    again = client.post("/api/query", json={"query": "Hello Flask", "priority": 1}).get_json()
    assert again["cache_hit"] is True and again["result"] == body["result"]


def test_stats_counts_the_requests(client):
    client.post("/api/query", json={"query": "count me"})
    stats = client.get("/api/stats")
    assert stats.status_code == 200
    body = stats.get_json()
    assert body["requests"] >= 1 and body["model"] == "demo" and body["ready"] is True


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "x", "priority": "high"}, "priority"),
        ({"query": "x", "nonsense": True}, "nonsense"),
        ({"query": "x", "max_new_tokens": -1}, "max_new_tokens"),
        ([1, 2], "body"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, payload, field):
    response = client.post("/api/query", json=payload)
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"]["param"] == field
    assert body["error"]["message"].startswith(f"{field}:")


def test_non_json_body_is_422(client):
    response = client.post("/api/query", data=b"{not json", content_type="application/json")
    assert response.status_code == 422
    assert response.get_json()["error"]["param"] == "body"
    assert client.post("/api/query", data="query=x").status_code == 422  # form body, no JSON


def test_wrong_method_is_405(client):
    assert client.get("/api/query").status_code == 405


def test_bad_cache_config_fails_at_init():
    app = Flask("bad")
    app.config["BUL_CACHE_CONFIG"] = {"max_tokens": 8192, "cache_strategy": "fastest"}
    with pytest.raises(ValueError, match="cache_strategy"):
        BUL(app)

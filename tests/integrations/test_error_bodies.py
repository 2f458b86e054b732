"""One error body on every HTTP face: the same bad request to `bul serve`'s FastAPI app, the Flask
extension and the Django app gets the same 422 body (`bulk.errors.error_body`), and `bul serve`'s
WebSocket sends it as its error message."""

from __future__ import annotations

import pytest
from django.test import Client as DjangoClient
from fastapi.testclient import TestClient
from flask import Flask

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import InvalidRequestError, error_body, invalid_request_body
from bulk.integrations.flask import BUL
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings

ENGINE = {"model": "demo", "device": "cpu", "default_max_new_tokens": 4}

# Requests the engine refuses (`InvalidRequestError`), each naming its field. The server's schema
# accepts their types, so FastAPI's answer comes from the same error as the others'.
BAD = [
    ({"query": ""}, "query"),
    ({"query": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ({"query": "x", "temperature": 9}, "temperature"),
    ({"query": "x", "text": "y"}, "query"),
]


@pytest.fixture(scope="module")
def fastapi_client(demo_model):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=demo_model)
    with TestClient(create_app(ServerSettings(**ENGINE), engine=engine)) as client:
        yield client
    engine.shutdown()


@pytest.fixture(scope="module")
def flask_client(tmp_path_factory):
    app = Flask(__name__)
    path = str(tmp_path_factory.mktemp("flask-errors"))
    app.config.update(BUL_CACHE_CONFIG={**ENGINE, "persistence_path": path}, BUL_WARMUP=False)
    BUL(app)
    yield app.test_client()
    BUL.engine(app).shutdown()


@pytest.mark.parametrize(("payload", "field"), BAD)
def test_the_three_frameworks_answer_one_body(fastapi_client, flask_client, django_settings, payload, field):
    answers = {
        "fastapi": fastapi_client.post("/api/query", json=payload),
        "flask": flask_client.post("/api/query", json=payload),
        "django": DjangoClient().post("/api/query", payload, "application/json"),
    }
    # Flask's test response has `.json` as a property; the others have a method.
    bodies = {name: r.get_json() if name == "flask" else r.json() for name, r in answers.items()}
    assert {name: response.status_code for name, response in answers.items()} == dict.fromkeys(answers, 422)
    assert bodies["flask"] == bodies["fastapi"] == bodies["django"], bodies
    with fastapi_client.websocket_connect("/ws/query") as ws:
        ws.send_json({**payload, "id": "echoed"})
        assert ws.receive_json() == {"id": "echoed", **bodies["fastapi"]}
    body = bodies["fastapi"]
    assert body["error"]["param"] == field and body["error"]["message"].startswith(f"{field}: ")
    assert body["detail"] == [
        {"loc": ["body", field], "msg": body["error"]["message"], "type": "value_error"}
    ]


def test_a_body_that_is_not_an_object_is_one_shape_too(flask_client, django_settings):
    flask = flask_client.post("/api/query", json=[1, 2]).json
    django = DjangoClient().post("/api/query", [1], "application/json").json()
    for body in (flask, django):
        assert body["error"]["param"] == "body" and body["error"]["code"] == 422
        assert set(body) == {"detail", "error"}


def test_the_body_helper():
    body = invalid_request_body(
        InvalidRequestError("max_new_tokens", "must be between 1 and 8"), "max_tokens"
    )
    assert body == error_body(422, "max_tokens: must be between 1 and 8", "max_tokens")
    assert body["error"] == {
        "message": "max_tokens: must be between 1 and 8",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": 422,
    }
    assert error_body(503, "down") == {
        "detail": "down",
        "error": {"message": "down", "type": "server_error", "param": None, "code": 503},
    }


def test_engine_errors_have_one_body():
    # FastAPI's handlers, the WebSocket, Flask and Django all answer an engine error with this helper.
    from bulk.errors import EngineClosedError, ModelLoadError, engine_error_body

    assert engine_error_body(EngineClosedError("closed")) == error_body(503, "the server is shutting down")
    assert engine_error_body(ModelLoadError("no file")) == error_body(
        503, "the model could not be loaded: no file"
    )
    closed = engine_error_body(EngineClosedError("x"))
    assert closed["error"]["code"] == 503 and closed["error"]["type"] == "server_error"

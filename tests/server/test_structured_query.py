"""Structured outputs (`structured_outputs`, the engine's request field) through the guide's faces over
a real socket: `POST /api/query`, `POST /api/batch` (then its tasks) and `/ws/query` (whole and
streamed). Every answer the demo model's random weights give parses as JSON and validates against its
schema (`jsonschema`); a schema the grammar engine cannot serve (`not`) is a 422 naming
`structured_outputs.json`, and the same body on the WebSocket."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import requests
import websockets

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from tests.helpers import wait_until
from tests.schemas import PERSON, UNSERVABLE
from tests.server.conftest import ENGINE, settings, wait_ready
from tests.server.live_server import LiveServer

MAX_NEW_TOKENS = 160
LIMITS = {"max_new_tokens_limit": 256}


@pytest.fixture(scope="module")
def live(demo_model):
    # An engine and server of their own: the shared ones allow 8 new tokens at most.
    config = KVCacheConfig(**{**ENGINE, **LIMITS})
    with (
        UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine,
        LiveServer(create_app(settings(**LIMITS, max_body_bytes=16384), engine=engine)) as live,
    ):
        wait_ready(live.url)
        yield live


def _valid(answer: dict, schema: dict) -> None:
    assert answer["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(answer["result"]), schema)


def _query(text: str, schema: dict, **fields) -> dict:
    return {"query": text, "structured_outputs": {"json": schema}, "max_new_tokens": MAX_NEW_TOKENS, **fields}


def test_api_query_answers_follow_the_schema(live):
    for body in (_query("Give me a person", PERSON), _query("x", PERSON, temperature=1.2, seed=3)):
        response = requests.post(f"{live.url}/api/query", json=body, timeout=120)
        assert response.status_code == 200, response.text
        _valid(response.json(), PERSON)
    # The schema as its JSON text is the same constraint.
    text = {**_query("Give me a person", PERSON), "structured_outputs": {"json": json.dumps(PERSON)}}
    response = requests.post(f"{live.url}/api/query", json=text, timeout=120)
    assert response.status_code == 200, response.text
    _valid(response.json(), PERSON)


def test_api_query_refuses_a_schema_it_cannot_serve(live):
    response = requests.post(f"{live.url}/api/query", json=_query("q", UNSERVABLE), timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "structured_outputs.json" and "not" in error["message"], error
    # Not an object with one kind: pydantic's type check, or the engine's, both 422s.
    for bad in ({"structured_outputs": "json"}, {"structured_outputs": {"json": PERSON, "regex": "a"}}):
        response = requests.post(f"{live.url}/api/query", json={"query": "q", **bad}, timeout=30)
        assert response.status_code == 422, (bad, response.text)
        assert "structured_outputs" in json.dumps(response.json()), response.text


def test_the_published_schema_states_the_field(live):
    schema = requests.get(f"{live.url}/openapi.json", timeout=30).json()
    field = schema["components"]["schemas"]["QueryRequest"]["properties"]["structured_outputs"]
    assert set(field["properties"]) == {"json", "json_object", "regex", "choice", "grammar"}
    assert field["maxProperties"] == 1 and field["description"]


def test_api_batch_tasks_follow_their_constraints(live):
    choices = ["alpha", "beta", "gamma"]
    batch = [
        _query("Batch person", PERSON),
        {"query": "Pick one", "structured_outputs": {"choice": choices}, "max_new_tokens": 16},
    ]
    accepted = requests.post(f"{live.url}/api/batch", json=batch, timeout=30)
    assert accepted.status_code == 200, accepted.text
    person_id, choice_id = accepted.json()["task_ids"]

    def finished(task_id: str) -> dict | None:
        status = requests.get(f"{live.url}/api/task/{task_id}", timeout=30).json()
        return None if status["status"] == "processing" else status

    person = wait_until(lambda: finished(person_id), 120, 0.1, "the person task")
    assert person["status"] == "completed", person
    _valid(person["result"], PERSON)
    choice = wait_until(lambda: finished(choice_id), 120, 0.1, "the choice task")
    assert choice["status"] == "completed" and choice["result"]["result"] in choices, choice


def test_api_batch_refuses_a_schema_it_cannot_serve_naming_the_query(live):
    batch = [{"query": "fine"}, _query("q", UNSERVABLE)]
    response = requests.post(f"{live.url}/api/batch", json=batch, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "1.structured_outputs.json", response.text


def test_websocket_answers_follow_the_schema_and_a_bad_one_is_the_http_body(live):
    async def run():
        async with websockets.connect(f"{live.ws_url}/ws/query") as ws:
            await ws.send(json.dumps({**_query("Socket person", PERSON), "id": 1}))
            whole = json.loads(await asyncio.wait_for(ws.recv(), 120))
            await ws.send(json.dumps({**_query("Streamed person", PERSON), "id": 2, "stream": True}))
            streamed = []
            while not streamed or not streamed[-1].get("done"):
                streamed.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            await ws.send(json.dumps({**_query("q", UNSERVABLE), "id": 3}))
            bad = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(json.dumps({**_query("q", UNSERVABLE), "id": 4, "stream": True}))
            bad_streamed = json.loads(await asyncio.wait_for(ws.recv(), 30))
            return whole, streamed, bad, bad_streamed

    whole, streamed, bad, bad_streamed = asyncio.run(run())
    assert whole["id"] == 1
    _valid(whole, PERSON)
    tokens, final = streamed[:-1], streamed[-1]
    assert final["id"] == 2 and final["result"] == "".join(m["token"] for m in tokens)
    _valid(final, PERSON)
    http = requests.post(f"{live.url}/api/query", json=_query("q", UNSERVABLE), timeout=30)
    assert http.status_code == 422
    assert bad == {"id": 3, **http.json()} and bad_streamed == {"id": 4, **http.json()}
    assert bad["error"]["param"] == "structured_outputs.json"

"""Structured outputs through the Celery tasks, against a real `bul worker` on the real Redis (database
13): `structured_outputs` crosses the broker as JSON in the request dict, the worker's engine keeps its
answer to the schema, and a schema it cannot serve fails the task at once naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from bulk.integrations.celery.tasks import batch_process_task, process_document_task
from bulk.server.celery_routes import celery_task_status
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("bul_worker")
TIMEOUT_S = 120
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
UNSERVABLE = {"type": "object", "properties": {"a": {"not": {}}}, "required": ["a"]}


def _query(text: str, schema: dict) -> dict:
    return {"query": text, "structured_outputs": {"json": schema}, "max_new_tokens": 160}


def _failed(task_id: str) -> dict:
    def reached() -> dict | None:
        answer = celery_task_status(task_id)
        return answer if answer is not None and answer["status"] == "failed" else None

    return wait_until(reached, TIMEOUT_S, 0.1, f"task {task_id} to fail")


def test_document_and_batch_tasks_follow_the_schema():
    answer = process_document_task.delay(_query("A person", PERSON)).get(timeout=TIMEOUT_S)
    assert answer["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(answer["result"]), PERSON)
    batch = [_query("Batch person", PERSON), {"query": "Pick", "structured_outputs": {"choice": ["x", "y"]}}]
    person, choice = batch_process_task.delay(batch).get(timeout=TIMEOUT_S)
    jsonschema.validate(json.loads(person["result"]), PERSON)
    assert choice["result"] in ("x", "y")


def test_a_schema_it_cannot_serve_fails_the_task_naming_the_field():
    one = process_document_task.delay(_query("q", UNSERVABLE))
    assert _failed(one.id)["error"].startswith("structured_outputs.json:")
    batch = batch_process_task.delay([{"query": "fine", "max_new_tokens": 4}, _query("q", UNSERVABLE)])
    assert _failed(batch.id)["error"].startswith("queries[1].structured_outputs.json:")

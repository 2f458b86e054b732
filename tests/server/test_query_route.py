"""`POST /api/query` reads and validates its body itself (the hot path): the same 422s, the same
OpenAPI description and the same body limit as FastAPI's own body handling, over a real socket."""

from __future__ import annotations

import requests

from bulk.server.schemas import QueryRequest


def test_bodies_that_are_not_a_json_object_are_422s(server):
    url = f"{server.url}/api/query"
    empty = requests.post(url, data=b"", headers={"content-type": "application/json"}, timeout=10)
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "body"
    text = requests.post(url, data=b'{"query": "hi"}', headers={"content-type": "text/plain"}, timeout=10)
    assert text.status_code == 422 and "application/json" in text.json()["error"]["message"]
    array = requests.post(url, json=[{"query": "hi"}], timeout=10)
    assert array.status_code == 422 and array.json()["detail"][0]["loc"] == ["body"]
    broken = requests.post(url, data=b'{"query": ', headers={"content-type": "application/json"}, timeout=10)
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    # Locations are under "body", as FastAPI writes them.
    typed = requests.post(url, json={"query": "hi", "seed": "one"}, timeout=10)
    assert typed.status_code == 422 and typed.json()["detail"][0]["loc"] == ["body", "seed"]


def test_json_content_types_with_parameters_are_accepted(server):
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json", None):
        headers = {"content-type": content_type} if content_type else {}
        answer = requests.post(
            f"{server.url}/api/query", data=b'{"query": "content types"}', headers=headers, timeout=60
        )
        assert answer.status_code == 200, (content_type, answer.text)
        assert answer.headers["content-type"] == "application/json"


def test_the_openapi_description_is_the_models(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    operation = schema["paths"]["/api/query"]["post"]
    body = operation["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/QueryRequest"}
    component = schema["components"]["schemas"]["QueryRequest"]
    assert component["additionalProperties"] is False
    assert set(component["properties"]) == set(QueryRequest.model_fields)
    assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HTTPValidationError"
    }
    assert "HTTPValidationError" in schema["components"]["schemas"]


def test_the_body_limit_applies_to_chunked_bodies_too(server):
    # A generator body is sent chunked, with no Content-Length: the limit counts it as it arrives.
    def chunks(total: int):
        sent = 0
        while sent < total:
            part = b" " * min(4096, total - sent)
            sent += len(part)
            yield part

    def chunked(prefix: bytes, padding: int):
        yield prefix
        yield from chunks(padding)
        yield b'"}'

    big = requests.post(
        f"{server.url}/api/query",
        data=chunked(b'{"query": "', 20_000),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert big.status_code == 413  # the test server's limit is 16 KiB
    small = requests.post(
        f"{server.url}/api/query",
        data=chunked(b'{"query": "chunked', 100),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert small.status_code == 200, small.text
    declared = requests.post(f"{server.url}/v1/completions", json={"prompt": "x" * 20_000}, timeout=10)
    assert declared.status_code == 413 and "BUL_MAX_BODY_BYTES" in declared.json()["detail"]


def test_identical_bodies_get_their_own_request_ids(server):
    body = b'{"query": "same body twice", "max_new_tokens": 2}'
    headers = {"content-type": "application/json"}
    answers = [
        requests.post(f"{server.url}/api/query", data=body, headers=headers, timeout=60).json()
        for _ in range(3)
    ]
    assert len({a["request_id"] for a in answers}) == 3
    assert answers[1]["response_cached"] and answers[1]["result"] == answers[0]["result"]
    mine = b'{"query": "same body twice", "max_new_tokens": 2, "request_id": "mine-1"}'
    again = [
        requests.post(f"{server.url}/api/query", data=mine, headers=headers, timeout=60).json()
        for _ in range(2)
    ]
    assert [a["request_id"] for a in again] == ["mine-1", "mine-1"]
    plain = requests.post(
        f"{server.url}/api/query", data=body, headers={"content-type": "text/plain"}, timeout=60
    )
    assert plain.status_code == 422  # a remembered body is still checked for its content type

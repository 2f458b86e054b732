"""Property-based: schemathesis generates requests from /openapi.json and sends them to the live
server. No generated input may produce a 5xx; every request the schema allows is accepted (so
schemathesis's "schema allows what the API rejects" warning cannot fire for any route) and every
request it forbids is refused with a 4xx (so the schema is not stricter than the API either).

(schemathesis's pytest plugin does not run under this pytest release, so the test drives its
per-operation Hypothesis strategies itself.)"""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from bulk.models.tokenizer import ByteTokenizer
from bulk.server.app import create_app
from bulk.server.openapi import NOT_BLANK
from tests.server.conftest import ENGINE, wait_ready
from tests.server.conftest import settings as server_settings
from tests.server.live_server import LiveServer

EXAMPLES = 8  # per operation and mode: enough to hit every field, small enough to stay fast
MAX_BODY_BYTES = 16384
# The demo model's context holds 4096 tokens; its tokenizer spends at most 4 per character, so
# every query the schema allows (up to this many characters) fits with its answer.
SERVER = {"max_body_bytes": MAX_BODY_BYTES, "max_query_chars": 1000, "max_batch_queries": 4}


@pytest.fixture(scope="module")
def live(api_engine):
    # A server of its own: generated batches must not leave tasks queued for the other tests.
    with LiveServer(create_app(server_settings(**SERVER), engine=api_engine)) as live:
        wait_ready(live.url)
        yield live


def test_the_schema_states_the_limits(live):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json").raw_schema
    query = schema["components"]["schemas"]["QueryRequest"]["properties"]
    assert query["query"]["maxLength"] == 1000 and query["priority"]["maximum"] == 1000
    assert query["max_new_tokens"]["maximum"] == 8 and query["top_p"]["exclusiveMinimum"] == 0
    assert (query["min_tokens"]["minimum"], query["min_tokens"]["maximum"]) == (0, 8)
    batch = schema["paths"]["/api/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 4)
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["prompt"]["maxItems"] == 1 and completion["max_tokens"]["maximum"] == 8


def test_the_not_blank_pattern_is_what_the_engine_calls_blank():
    pattern = re.compile(NOT_BLANK)
    for code in range(0x110000):
        char = chr(code)
        if not 0xD800 <= code < 0xE000:  # surrogates cannot cross JSON as UTF-8
            assert bool(pattern.search(char)) is bool(char.strip()), hex(code)


def _accepted(case, response) -> bool:
    """What a request the schema allows may get: an answer, a 404 for a task id that does not exist,
    a 413 for a body over BUL_MAX_BODY_BYTES (a size JSON Schema cannot state), or a 422 naming
    `min_tokens` when it is above the request's own maximum of new tokens, `top_logprobs` without
    `logprobs: true` (limits between two fields, which JSON Schema cannot state either), a token
    id field holding an id beyond the model's vocabulary (which the schema does not know), or a
    structured output's schema, regex or grammar that does not compile, or tool fields that do not
    agree (a named tool choice among the tools, a call's arguments a JSON object's text: rules
    between values that JSON Schema cannot state)."""
    if 200 <= response.status_code < 300:
        return True
    if response.status_code == 404 and "{task_id}" in case.operation.path:
        return True
    param = str(response.json()["error"]["param"]) if response.status_code == 422 else ""
    bodies = case.body if isinstance(case.body, list) else [case.body]
    bodies = [body for body in bodies if isinstance(body, dict)]
    if param.endswith("min_tokens"):
        return any(_min_tokens_above_max(body) for body in bodies)
    if param.endswith(("logit_bias", "stop_token_ids")):
        return any(_beyond_vocabulary(body) for body in bodies)
    if _constraint_or_tools(param):
        return True
    if param == "top_logprobs":
        return any(
            body.get("top_logprobs") is not None and body.get("logprobs") is not True for body in bodies
        )
    sent = response.request.body or b""
    return response.status_code == 413 and len(sent) > MAX_BODY_BYTES


def _constraint_or_tools(param: str) -> bool:
    head = param.split(".")[1] if param[:1].isdigit() else param.split(".")[0]  # a batch's "1.field"
    return head in ("structured_outputs", "response_format", "tools", "tool_choice") or (
        head.startswith("guided_") or ".tool_calls" in param
    )


def _beyond_vocabulary(body: dict) -> bool:
    """A token id the schema allows but the demo model's vocabulary does not hold."""
    ids = [int(token) for token in body.get("logit_bias") or {}] + list(body.get("stop_token_ids") or [])
    return any(token >= ByteTokenizer.vocab_size for token in ids)


def _min_tokens_above_max(body: dict) -> bool:
    """`min_tokens` above the maximum the engine is given: `max_completion_tokens`, then
    `max_tokens` (the OpenAI routes), `max_new_tokens`, else the default."""
    names = ("max_completion_tokens", "max_tokens", "max_new_tokens")
    maximum = next((body[n] for n in names if body.get(n) is not None), ENGINE["default_max_new_tokens"])
    return body.get("min_tokens") is not None and body["min_tokens"] > maximum


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_what_the_schema_says(live, mode):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/query", "/api/batch", "/v1/chat/completions", "/health"}
    seen: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            response = case.call(base_url=live.url, timeout=60)
            seen.append(case.operation.path)
            described = (
                f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code} {response.text}"
            )
            assert response.status_code < 500, described
            if mode is GenerationMode.POSITIVE:
                assert _accepted(case, response), f"the schema allows what the API rejects: {described}"
            else:
                assert 400 <= response.status_code < 500, (
                    f"the API accepts what the schema forbids: {described}"
                )

        try:
            check()
        except Unsatisfiable:
            # No invalid input exists for a GET whose only parameter is a free string (or none at all).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert len(set(seen)) >= (8 if mode is GenerationMode.POSITIVE else 3)

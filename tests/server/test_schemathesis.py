"""Property-based: schemathesis generates requests, valid and invalid, from /openapi.json and sends
them to the live server; no generated input may produce a 5xx.

(schemathesis's pytest plugin does not run under this pytest release, so the test drives its
per-operation Hypothesis strategies itself.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from bulk.server.app import create_app
from tests.server.conftest import settings as server_settings
from tests.server.conftest import wait_ready
from tests.server.live_server import LiveServer

EXAMPLES = 8  # per operation and mode: enough to hit every field, small enough to stay fast


@pytest.fixture(scope="module")
def live(api_engine):
    # A server of its own: generated batches must not leave tasks queued for the other tests.
    with LiveServer(create_app(server_settings(max_body_bytes=16384), engine=api_engine)) as live:
        wait_ready(live.url)
        yield live


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_input_gets_a_5xx(live, mode):
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
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code} {response.text}"
            )

        try:
            check()
        except Unsatisfiable:
            # No invalid input exists for a GET whose only parameter is a free string (or none at all).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert len(set(seen)) >= (8 if mode is GenerationMode.POSITIVE else 3)

"""One source per schema: the request's fields are `bulk.engine.request.FIELDS`, the result's are
`bulk.engine.result.RESULT_FIELDS`, and every face follows them. Adding a field in one place and not
the others fails here, naming the place to change."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import FIELDS, parse_request
from bulk.engine.result import LOGPROBS_FIELD, PER_REQUEST_FIELDS, RESULT_FIELDS, GenerationResult
from bulk.grpc_service import convert
from bulk.grpc_service.generated import bul_pb2
from bulk.server import websocket
from bulk.server.schemas import NOT_IN_QUERY_BODY, QueryRequest

PROTO = Path(__file__).resolve().parents[1] / "proto" / "bul.proto"


def proto_message_fields(name: str) -> set[str]:
    """The field names of message `name` in proto/bul.proto, as written there."""
    body = re.search(rf"^message {name} {{(.*?)^}}", PROTO.read_text(), re.S | re.M)
    assert body, f"no message {name} in {PROTO}"
    return set(re.findall(r"^\s+(?:optional |repeated )?[\w.]+ (\w+) = \d+;", body.group(1), re.M))


def test_the_request_fields_are_one_list():
    assert len(set(FIELDS)) == len(FIELDS)
    expected = set(FIELDS) - convert.NOT_IN_PROTO
    assert proto_message_fields("QueryRequest") == expected, "proto/bul.proto's QueryRequest vs FIELDS"
    assert {f.name for f in bul_pb2.QueryRequest.DESCRIPTOR.fields} == expected, "run `make proto`"
    assert set(QueryRequest.model_fields) == set(FIELDS) - NOT_IN_QUERY_BODY, "bulk/server/schemas.py"


def test_grpc_carries_every_request_field_it_declares():
    message = bul_pb2.QueryRequest(
        query="q", priority=3, max_new_tokens=5, temperature=0.5, top_p=0.9, seed=7, session_id="s",
        stop=["."], ignore_eos=True, min_tokens=2, response_cache=False, request_id="r",
        presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
        logit_bias=[bul_pb2.LogitBias(token_id=5, bias=1.0)], stop_token_ids=[3], logprobs=2,
    )  # fmt: skip
    message.structured_outputs.update({"json": {"type": "string", "maxLength": 4}})
    request = convert.request_to_engine(message)
    assert set(request) == set(FIELDS) - convert.NOT_IN_PROTO
    # A Struct's numbers are doubles: integral ones come back as ints (JSON Schema's `maxLength`).
    assert request["structured_outputs"] == {"json": {"type": "string", "maxLength": 4}}
    assert type(request["structured_outputs"]["json"]["maxLength"]) is int


def test_to_payload_writes_every_field_and_parses_back():
    config = KVCacheConfig(model="demo")
    common = {
        "priority": 3,
        "max_new_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "session_id": "s",
        "stop": ["."],
        "ignore_eos": True,
        "min_tokens": 2,
        "response_cache": False,
        "request_id": "r",
        "logprobs": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"5": 10, "7": -3.5},
        "stop_token_ids": [9, 3],
        "structured_outputs": {"json": {"type": "string", "maxLength": 4}},
    }
    raw = parse_request({**common, "text": "hello", "raw": True}, config)
    # Tools are offered to a conversation only.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chat = parse_request({**common, "messages": [{"role": "user", "content": "hi"}], "tools": tools}, config)
    written = set(raw.to_payload()) | set(chat.to_payload())
    # `text` is `query`'s other name: a payload always says `query`.
    assert written == set(FIELDS) - {"text"}, "GenerationRequest.to_payload vs FIELDS"
    for request in (raw, chat):
        assert parse_request(request.to_payload(), config) == request


def test_the_result_fields_are_one_list():
    assert tuple(GenerationResult.__annotations__) == RESULT_FIELDS
    assert set(RESULT_FIELDS) > PER_REQUEST_FIELDS
    # And `logprobs`, which an answer holds only when its request asked (`LOGPROBS_FIELD`).
    names = {convert.RESPONSE_NAMES.get(name, name) for name in RESULT_FIELDS} | {LOGPROBS_FIELD}
    assert proto_message_fields("QueryResponse") == names, "proto/bul.proto's QueryResponse vs RESULT_FIELDS"
    assert {f.name for f in bul_pb2.QueryResponse.DESCRIPTOR.fields} == names, "run `make proto`"
    assert websocket.ANSWER_FIELDS == RESULT_FIELDS
    readme = (PROTO.parents[1] / "README.md").read_text()
    sentence = re.search(r"The result holds (.*?)\.", readme, re.S)
    assert sentence and re.findall(r"`(\w+)`", sentence.group(1)) == list(RESULT_FIELDS), "README.md"


@pytest.fixture(scope="module")
def engine(demo_model):
    config = KVCacheConfig(model="demo", device="cpu", default_max_new_tokens=3)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        yield engine


async def test_every_answer_has_exactly_the_result_fields(engine):
    """The model's answer, the response cache's (as a dict and as JSON bytes, rebuilt from the stored
    answer), a stream's last event and gRPC's message: the same fields."""
    fresh = await engine.process_request({"query": "schema check"})
    cached = await engine.process_request({"query": "schema check"})
    assert not fresh["response_cached"] and cached["response_cached"]
    cached_json = json.loads(await engine.process_request_json({"query": "schema check"}))
    fresh_json = json.loads(await engine.process_request_json({"query": "schema check", "seed": 1}))
    events = [event async for event in engine.stream_request({"query": "schema check, streamed"})]
    last = {k: v for k, v in events[-1].items() if k != "done"}
    for answer in (fresh, cached, cached_json, fresh_json, last):
        assert tuple(sorted(answer)) == tuple(sorted(RESULT_FIELDS)), answer
    assert cached_json["response_cached"] and cached_json["result"] == fresh["result"]
    response = convert.result_to_response(fresh)
    assert response.result == fresh["result"] and response.latency_ms == pytest.approx(fresh["latency"])
    assert response.completion_tokens == fresh["completion_tokens"] == 3

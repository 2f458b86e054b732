"""Structured outputs over a real gRPC channel: `QueryRequest.structured_outputs` (a
`google.protobuf.Struct`, whose numbers are doubles) reaches the engine as its plain dict, integral
numbers as ints; ProcessQuery's and StreamQuery's answers then validate against the schema; a schema
the grammar engine cannot serve is INVALID_ARGUMENT naming `structured_outputs.json`."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2

from bulk.grpc_service import convert
from bulk.grpc_service.generated import bul_pb2
from bulk.grpc_service.servicer import FIELD_METADATA_KEY
from tests.schemas import PERSON as BASE
from tests.schemas import UNSERVABLE

# PERSON with a bounded number: a Struct carries every number as a float.
PERSON = {
    **BASE,
    "properties": {
        **BASE["properties"],
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
    },
    "required": [*BASE["required"], "score"],
}
MAX_NEW_TOKENS = 160


def _struct(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _request(query: str, schema: dict, **fields) -> bul_pb2.QueryRequest:
    return bul_pb2.QueryRequest(
        query=query, max_new_tokens=MAX_NEW_TOKENS, structured_outputs=_struct({"json": schema}), **fields
    )


def _valid(response: bul_pb2.QueryResponse) -> None:
    assert response.finish_reason == "stop", response
    jsonschema.validate(json.loads(response.result), PERSON)


def test_the_struct_reaches_the_engine_as_plain_json_with_integers():
    request = convert.request_to_engine(_request("q", PERSON))
    assert request["structured_outputs"] == {"json": PERSON}
    name = request["structured_outputs"]["json"]["properties"]["name"]
    assert type(name["maxLength"]) is int and type(name["minLength"]) is int
    score = request["structured_outputs"]["json"]["properties"]["score"]
    assert score["multipleOf"] == 0.25  # not integral: stays a float
    assert "structured_outputs" not in convert.request_to_engine(bul_pb2.QueryRequest(query="q"))
    other = convert.request_to_engine(
        bul_pb2.QueryRequest(query="q", structured_outputs=_struct({"choice": ["a", "b"], "regex": None}))
    )
    assert other["structured_outputs"] == {"choice": ["a", "b"], "regex": None}


async def test_process_query_answers_follow_the_schema(stub):
    _valid(await stub.ProcessQuery(_request("Give me a person", PERSON)))
    _valid(await stub.ProcessQuery(_request("x", PERSON, temperature=1.2, seed=5)))


async def test_stream_query_answer_follows_the_schema(stub):
    chunks = [chunk async for chunk in stub.StreamQuery(_request("Stream a person", PERSON))]
    tokens, last = chunks[:-1], chunks[-1]
    assert last.WhichOneof("chunk") == "response"
    assert "".join(chunk.token for chunk in tokens) == last.response.result
    _valid(last.response)


@pytest.mark.parametrize("rpc", ["ProcessQuery", "StreamQuery"])
async def test_a_schema_it_cannot_serve_is_invalid_argument_naming_the_field(stub, rpc):
    request = _request("q", UNSERVABLE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "ProcessQuery":
            await stub.ProcessQuery(request)
        else:
            async for _ in stub.StreamQuery(request):
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("structured_outputs.json:")
    assert "not" in caught.value.details()
    assert (FIELD_METADATA_KEY, "structured_outputs.json") in tuple(caught.value.trailing_metadata())


async def test_an_empty_or_ambiguous_constraint_is_invalid_argument(stub):
    for value in ({}, {"json": PERSON, "regex": "a+"}):
        request = bul_pb2.QueryRequest(query="q", structured_outputs=_struct(value))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ProcessQuery(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("structured_outputs:"), caught.value.details()

"""Bytes that are not a valid request get INVALID_ARGUMENT over a real channel, never UNKNOWN, and the
server keeps serving. The raw bytes are sent with no serializer, as a broken client would send them."""

from __future__ import annotations

import grpc
import pytest

from bulk.grpc_service.generated import bul_pb2
from bulk.grpc_service.handlers import FIELD_METADATA_KEY, Undecodable, _decoder

VALID = bul_pb2.QueryRequest(query="Create marketing strategy", priority=3).SerializeToString()
UNDECODABLE = {
    # Field 1 (query), length 2, bytes that are not UTF-8: proto3 strings must be.
    "invalid UTF-8 in a string field": b"\x0a\x02\xff\xfe",
    "garbage": b"\xff\xff\xff\xff\xff",
    # The query's length says 25 bytes; 4 follow.
    "truncated": VALID[:6],
    # A varint that never ends.
    "endless varint": b"\x10" + b"\xff" * 11,
}


def test_the_decoder_marks_what_does_not_parse():
    assert isinstance(_decoder(bul_pb2.QueryRequest)(VALID), bul_pb2.QueryRequest)
    for data in UNDECODABLE.values():
        marked = _decoder(bul_pb2.QueryRequest)(data)
        assert isinstance(marked, Undecodable) and marked.type_name == "bul.v1.QueryRequest"


def _raw(channel: grpc.aio.Channel, method: str, response: type, streaming: bool = False):
    call = channel.unary_stream if streaming else channel.unary_unary
    return call(
        f"/bul.v1.BULService/{method}", request_serializer=None, response_deserializer=response.FromString
    )


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
async def test_undecodable_request_bytes_are_invalid_argument(stub, channel, case):
    data = UNDECODABLE[case]
    process = _raw(channel, "ProcessQuery", bul_pb2.QueryResponse)
    stream = _raw(channel, "StreamQuery", bul_pb2.TokenChunk, streaming=True)

    async def drain():
        return [chunk async for chunk in stream(data)]

    for call in (process(data), drain()):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert caught.value.details().startswith("request: not a valid bul.v1.QueryRequest message (")
        assert (FIELD_METADATA_KEY, "request") in tuple(caught.value.trailing_metadata())
    # The same channel and server still answer a valid request, raw or through the stub.
    answer = await process(
        bul_pb2.QueryRequest(query="after bad bytes", max_new_tokens=2).SerializeToString()
    )
    assert (
        answer.result
        and (await stub.ProcessQuery(bul_pb2.QueryRequest(query="stub", max_new_tokens=2))).result
    )


async def test_undecodable_stats_request_is_invalid_argument(stub, channel):
    stats = _raw(channel, "GetStats", bul_pb2.StatsResponse)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stats(UNDECODABLE["garbage"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bul.v1.StatsRequest" in caught.value.details()
    assert (await stats(b"")).model  # an empty message is a valid StatsRequest

"""The sampling fields over gRPC: `logprobs` (in the response and in each stream chunk), and the
logit-changing `presence_penalty`, `frequency_penalty`, `repetition_penalty`, `logit_bias` (repeated
`LogitBias`) and `stop_token_ids`, which reach the engine (unset, the engine's defaults apply); bad
values are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest

from bulk.grpc_service import convert
from bulk.grpc_service.generated import bul_pb2
from bulk.grpc_service.servicer import FIELD_METADATA_KEY
from tests.conftest import ENDS_EARLY

A = ord("A")


async def test_the_fields_reach_the_engine(stub):
    async def ask(**fields) -> str:
        message = bul_pb2.QueryRequest(query=ENDS_EARLY, max_new_tokens=8, temperature=0.0, **fields)
        return (await stub.ProcessQuery(message)).result

    plain = await ask()
    assert await ask(logit_bias=[bul_pb2.LogitBias(token_id=A, bias=100)]) == "A" * 8
    penalised = await ask(frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain and len(set(penalised)) == len(penalised)
    assert await ask(repetition_penalty=1.8) != plain
    stop = next(i for i, char in enumerate(plain) if char != plain[0])
    assert await ask(stop_token_ids=[ord(plain[stop])]) == plain[:stop]

    call = stub.StreamQuery(
        bul_pb2.QueryRequest(
            query=ENDS_EARLY, max_new_tokens=4, logit_bias=[bul_pb2.LogitBias(token_id=A, bias=100)]
        )
    )
    chunks = [chunk async for chunk in call]
    assert "".join(c.token for c in chunks[:-1]) == chunks[-1].response.result == "AAAA"


def test_presence_decides_what_is_sent():
    unset = convert.request_to_engine(bul_pb2.QueryRequest(query="q"))
    assert not {
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "stop_token_ids",
    } & set(unset)
    sent = convert.request_to_engine(
        bul_pb2.QueryRequest(
            query="q", presence_penalty=0.0, logit_bias=[bul_pb2.LogitBias(token_id=5, bias=-1)]
        )
    )
    assert sent["presence_penalty"] == 0.0 and sent["logit_bias"] == {"5": -1.0}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -9}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": [bul_pb2.LogitBias(token_id=-1, bias=1)]}, "logit_bias"),
        ({"logit_bias": [bul_pb2.LogitBias(token_id=5, bias=101)]}, "logit_bias"),
        ({"logit_bias": [bul_pb2.LogitBias(token_id=10**6, bias=1)]}, "logit_bias"),  # beyond the vocabulary
        ({"stop_token_ids": [-2]}, "stop_token_ids"),
    ],
)
async def test_bad_values_are_invalid_argument_naming_the_field(stub, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ProcessQuery(bul_pb2.QueryRequest(query="q", **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (FIELD_METADATA_KEY, field) in tuple(caught.value.trailing_metadata())


async def test_logprobs_in_the_response_and_the_stream(stub):
    message = bul_pb2.QueryRequest(query=ENDS_EARLY, max_new_tokens=5, logprobs=2)
    response = await stub.ProcessQuery(message)
    assert len(response.logprobs) == response.completion_tokens == 5
    assert "".join(entry.token for entry in response.logprobs) == response.result
    for entry in response.logprobs:
        assert entry.bytes == entry.token.encode() and entry.logprob <= 0.0
        assert [top.token_id for top in entry.top_logprobs][:1] == [entry.token_id]  # greedy
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    chunks = [chunk async for chunk in stub.StreamQuery(message)]
    streamed = [entry.token_id for chunk in chunks[:-1] for entry in chunk.logprobs]
    assert streamed == [entry.token_id for entry in chunks[-1].response.logprobs]
    assert not (await stub.ProcessQuery(bul_pb2.QueryRequest(query=ENDS_EARLY, max_new_tokens=5))).logprobs
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ProcessQuery(bul_pb2.QueryRequest(query="q", logprobs=21))
    assert (FIELD_METADATA_KEY, "logprobs") in tuple(caught.value.trailing_metadata())

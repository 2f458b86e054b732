"""BULService over a real gRPC channel: answers, cache hits, streaming, stats and error statuses."""

from __future__ import annotations

import grpc
import pytest

from bulk.grpc_service.generated import bul_pb2
from bulk.grpc_service.servicer import FIELD_METADATA_KEY

QUERY = "Create marketing strategy"


async def test_process_query_answers_then_hits_the_cache(stub, engine):
    request = bul_pb2.QueryRequest(query=QUERY, priority=1, max_new_tokens=6)
    first = await stub.ProcessQuery(request)
    second = await stub.ProcessQuery(request)

    assert first.result and not first.cache_hit and not first.response_cached
    assert 0 < first.completion_tokens <= 6 and first.prompt_tokens == len(
        engine.model.tokenizer.encode(QUERY)
    )
    assert first.finish_reason in ("stop", "length") and first.model == "demo" and first.request_id
    assert first.latency_ms > 0
    assert second.cache_hit and second.response_cached and second.result == first.result
    assert second.cached_tokens == second.prompt_tokens == first.prompt_tokens


async def test_guide_fields_alone_work(stub):
    """A client built from the guide's proto sends only query and priority."""
    response = await stub.ProcessQuery(bul_pb2.QueryRequest(query=QUERY, priority=3))
    assert response.result and response.latency_ms > 0


async def test_stream_query_sends_tokens_one_by_one_then_the_answer(stub):
    request = bul_pb2.QueryRequest(query=QUERY + " for a bakery", max_new_tokens=8, response_cache=False)
    chunks = [chunk async for chunk in stub.StreamQuery(request)]

    tokens = [chunk.token for chunk in chunks[:-1]]
    assert all(chunk.WhichOneof("chunk") == "token" for chunk in chunks[:-1])
    assert chunks[-1].WhichOneof("chunk") == "response"
    final = chunks[-1].response
    assert len(tokens) > 1 and len(tokens) <= final.completion_tokens
    assert "".join(tokens) == final.result
    unary = await stub.ProcessQuery(request)  # greedy: the same text without streaming
    assert unary.result == final.result and not unary.response_cached


async def test_get_stats_reports_requests_latency_and_tiers(stub):
    before = await stub.GetStats(bul_pb2.StatsRequest())
    assert before.requests == 0 and before.ready and before.model == "demo"
    assert not before.latency_ms.HasField("p50")  # no request yet: unset, not 0 ms

    await stub.ProcessQuery(bul_pb2.QueryRequest(query=QUERY, max_new_tokens=4))
    await stub.ProcessQuery(bul_pb2.QueryRequest(query=QUERY, max_new_tokens=4))
    stats = await stub.GetStats(bul_pb2.StatsRequest())

    assert stats.requests == 2 and stats.cache_hits == 1 and stats.response_cache_hits == 1
    assert stats.hit_rate == pytest.approx(0.5)
    assert stats.latency_ms.HasField("p50") and stats.latency_ms.p95 >= stats.latency_ms.p50 > 0
    assert "memory" in stats.tiers and stats.tiers["memory"].size_bytes > 0
    assert stats.response_cache.entries == 1
    assert stats.details["requests"] == 2 and stats.details["config"]["block_size"] > 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": QUERY, "max_new_tokens": 0}, "max_new_tokens"),
        ({"query": QUERY, "max_new_tokens": 10**6}, "max_new_tokens"),
        ({"query": QUERY, "temperature": 9.0}, "temperature"),
        ({"query": QUERY, "top_p": 0.0}, "top_p"),
        ({"query": QUERY, "seed": 2**63}, "seed"),
        ({"query": QUERY, "session_id": ""}, "session_id"),
        ({"query": QUERY, "max_new_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"query": QUERY, "min_tokens": -1}, "min_tokens"),
        ({"query": "x" * 5000, "max_new_tokens": 2}, "query"),  # longer than the model's context
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(stub, request_fields, field):
    request = bul_pb2.QueryRequest(**request_fields)
    for call in (stub.ProcessQuery(request), _drain(stub.StreamQuery(request))):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:")
        assert (FIELD_METADATA_KEY, field) in tuple(caught.value.trailing_metadata())


async def test_bad_input_leaves_the_server_serving(stub):
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ProcessQuery(bul_pb2.QueryRequest(query=""))
    assert (await stub.ProcessQuery(bul_pb2.QueryRequest(query=QUERY, max_new_tokens=2))).result
    assert (await stub.GetStats(bul_pb2.StatsRequest())).invalid_requests == 1


async def test_closed_engine_is_unavailable(stub, engine):
    engine.shutdown()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ProcessQuery(bul_pb2.QueryRequest(query=QUERY, max_new_tokens=2))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unexpected_errors_are_internal_without_details(stub, engine, monkeypatch, caplog):
    def broken_stats():
        raise RuntimeError("secret detail")

    monkeypatch.setattr(engine, "get_stats", broken_stats)  # a bug in the engine, injected
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStats(bul_pb2.StatsRequest())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details() and "secret detail" in caplog.text


async def test_cancelled_stream_leaves_the_server_serving(stub):
    call = stub.StreamQuery(bul_pb2.QueryRequest(query=QUERY, max_new_tokens=64, response_cache=False))
    first = await call.read()
    assert first.WhichOneof("chunk") == "token"
    call.cancel()
    response = await stub.ProcessQuery(bul_pb2.QueryRequest(query="After a cancel", max_new_tokens=2))
    assert response.result


async def _drain(call) -> None:
    async for _ in call:
        pass

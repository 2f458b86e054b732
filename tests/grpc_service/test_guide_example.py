"""The guide's gRPC server (examples/grpc_server_guide.py, its servicer verbatim) in its own process,
called over a real channel with the committed stubs."""

from __future__ import annotations

import sys

import grpc

from bulk.grpc_service.generated import bul_pb2, bul_pb2_grpc


async def test_guide_server_answers_process_query(start_process, free_port, wait_until_answering):
    process = start_process([sys.executable, "examples/grpc_server_guide.py"], BUL_GRPC_PORT=str(free_port))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port}") as channel:
        await wait_until_answering(channel, process)
        stub = bul_pb2_grpc.BULServiceStub(channel)
        request = bul_pb2.QueryRequest(query="Create marketing strategy", priority=1)

        first = await stub.ProcessQuery(request, timeout=120)
        second = await stub.ProcessQuery(request, timeout=120)

    assert first.result and not first.cache_hit and first.latency_ms > 0
    assert second.result == first.result and second.cache_hit

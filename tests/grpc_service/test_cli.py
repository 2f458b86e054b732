"""`bul grpc` as users run it: a real process, configured from the environment, stopped by SIGTERM."""

from __future__ import annotations

import signal
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bulk.cli.main import main
from bulk.grpc_service.generated import bul_pb2, bul_pb2_grpc
from bulk.grpc_service.server import SERVICE_NAME
from tests.helpers import wait_until_async


async def test_bul_grpc_serves_until_sigterm(start_process, free_port, wait_until_answering):
    process = start_process(
        [sys.executable, "-m", "bulk.cli.main", "grpc", "--host", "127.0.0.1", "--model", "demo"],
        BUL_GRPC_PORT=str(free_port),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port}") as channel:
        await wait_until_answering(channel, process)
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:  # warming up
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            return (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING

        await wait_until_async(serving, 120, 0.1, "SERVING")

        stub = bul_pb2_grpc.BULServiceStub(channel)
        response = await stub.ProcessQuery(bul_pb2.QueryRequest(query="Hola", max_new_tokens=3))
        assert response.result and response.model == "demo"

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "gRPC server stopping" in stderr


def test_bad_port_is_a_usage_error(caplog):
    assert main(["grpc", "--port", "70000"]) == 2
    assert "BUL_GRPC_PORT: " in caplog.text  # the variable, as every service names a bad value

"""The standard health service (NOT_SERVING until warm) and server reflection, over a real channel."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bulk.grpc_service.server import SERVICE_NAME, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_is_not_serving_until_warm_then_serving(cold_server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == NOT_SERVING

    await cold_server.warm_up()

    assert cold_server.engine.ready
    for name in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == SERVING


async def test_health_watch_sees_the_graceful_shutdown(server, channel):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await watch.read()).status == SERVING
    await server.health.enter_graceful_shutdown()
    assert (await watch.read()).status == NOT_SERVING
    watch.cancel()


async def test_reflection_lists_the_service_and_serves_its_schema(server, channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, schema = [response async for response in reflection.ServerReflectionInfo(iter(requests))]

    names = {service.name for service in listed.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in schema.file_descriptor_response.file_descriptor_proto
    ]
    bul = next(file for file in files if file.name == "bul.proto")
    (service,) = bul.service
    assert service.name == "BULService"
    assert {method.name for method in service.method} == {"ProcessQuery", "GetStats", "StreamQuery"}


async def test_a_second_server_on_a_taken_port_fails(server, engine):
    with pytest.raises(OSError, match=str(server.port)):
        await start_server(engine, "127.0.0.1", server.port)

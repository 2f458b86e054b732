"""The `grpc.aio` server: BULService, the standard health service and server reflection around
one engine. The port opens at once and health answers NOT_SERVING until the engine is warm, so
orchestrators can tell "starting" from "down"; on stop it turns NOT_SERVING before draining."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.grpc_service.generated import bul_pb2
from bulk.grpc_service.handlers import add_bul_service
from bulk.grpc_service.servicer import BULServicer

log = logging.getLogger(__name__)

SERVICE_NAME = bul_pb2.DESCRIPTOR.services_by_name["BULService"].full_name  # "bul.v1.BULService"
# "" is the server as a whole: what `grpc_health_probe` and Kubernetes' gRPC probe ask by default.
HEALTH_SERVICES = ("", SERVICE_NAME)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    engine: UltraAdaptiveKVCacheEngine
    port: int

    async def warm_up(self) -> None:
        """Load the model and run one request, then report SERVING."""
        await self.engine.warmup()
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC server ready on port %d (model %s)", self.port, self.engine.config.model)

    async def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING first (so balancers stop sending), then let calls in flight finish for up to
        `grace` seconds. The engine is the caller's to shut down."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    engine: UltraAdaptiveKVCacheEngine, host: str = "[::]", port: int = 50051
) -> RunningServer:
    """Bind and start (port 0 picks a free port; `RunningServer.port` tells which). Health says
    NOT_SERVING until `warm_up()`."""
    # No SO_REUSEPORT: a second server on a taken port must fail, not silently share the traffic.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # Not the generated add_BULServiceServicer_to_server: undecodable requests get INVALID_ARGUMENT.
    add_bul_service(BULServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc's way of saying the address is taken or not ours
        raise OSError(f"cannot bind the gRPC server to {host}:{port} (in use?)") from exc
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("gRPC server listening on %s:%d, warming up", host, bound)
    return RunningServer(server=server, health=health_servicer, engine=engine, port=bound)


async def serve(engine: UltraAdaptiveKVCacheEngine, host: str, port: int, grace: float) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully and shut the engine down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(engine, host, port)
    warm = asyncio.create_task(running.warm_up())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({warm, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if warm in done:
            warm.result()  # a model that fails to load ends the server with its error
            await stopping
        log.info("gRPC server stopping (grace %.1f s)", grace)
    finally:
        warm.cancel()
        stopping.cancel()
        await running.stop(grace)
        await asyncio.to_thread(engine.shutdown)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

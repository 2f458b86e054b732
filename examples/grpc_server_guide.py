# Changed from the guide: imports added (asyncio, os, the engine; `bul_pb2`/`bul_pb2_grpc` come from
# bulk.grpc_service.generated, not top-level modules). The servicer is the guide's, only ruff-formatted.
# `serve` is async on `grpc.aio.server`, since the guide's async ProcessQuery cannot run on its sync
# thread-pool `grpc.server`; `add_in_port` does not exist, so `add_secure_port`; the port is a parameter
# (env BUL_GRPC_PORT) so tests can use a free one. The production server is `bul grpc`.
import asyncio
import os
from concurrent import futures

import grpc

from bulk.core.ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from bulk.grpc_service.generated import bul_pb2, bul_pb2_grpc


class BULServiceServicer(bul_pb2_grpc.BULServiceServicer):
    """Servidor gRPC."""

    def __init__(self):
        self.cache_engine = UltraAdaptiveKVCacheEngine(KVCacheConfig())

    async def ProcessQuery(self, request, context):
        """Procesar query."""
        result = await self.cache_engine.process_request(
            {
                "text": request.query,
                "priority": request.priority,
            }
        )

        return bul_pb2.QueryResponse(
            result=result["result"],
            cache_hit=result["cache_hit"],
            latency_ms=result["latency"],
        )


async def serve(port=50051):
    server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=10))
    bul_pb2_grpc.add_BULServiceServicer_to_server(
        BULServiceServicer(),
        server,
    )
    server.add_secure_port(f"[::]:{port}", grpc.insecure_server_credentials())
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(os.environ.get("BUL_GRPC_PORT", "50051"))))

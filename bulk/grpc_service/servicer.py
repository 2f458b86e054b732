"""The `BULService` servicer for a `grpc.aio` server: parse the message, call the engine, shape the
answer. Engine errors become status codes here, the gRPC boundary (see `status_for`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager

import grpc

from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.result import LOGPROBS_FIELD
from bulk.errors import (
    BulError,
    EngineClosedError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
)
from bulk.grpc_service.convert import (
    logprobs_to_proto,
    request_to_engine,
    result_to_response,
    stats_to_response,
)
from bulk.grpc_service.generated import bul_pb2, bul_pb2_grpc
from bulk.grpc_service.handlers import FIELD_METADATA_KEY

log = logging.getLogger(__name__)

__all__ = ["FIELD_METADATA_KEY", "BULServicer", "engine_errors", "status_for"]


def status_for(exc: BulError) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE  # shutting down: another replica can answer
    if isinstance(exc, ModelLoadError | InvalidConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION  # the server's setup, not the request, is wrong
    return grpc.StatusCode.INTERNAL


@asynccontextmanager
async def engine_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """End the call with the status for an engine error; its message names the field for bad input.
    Anything else is a bug: logged with its traceback, answered INTERNAL without its details."""
    try:
        yield
    except InvalidRequestError as exc:
        await context.abort(status_for(exc), str(exc), trailing_metadata=((FIELD_METADATA_KEY, exc.field),))
    except BulError as exc:
        log.warning("gRPC call failed: %s: %s", type(exc).__name__, exc)
        await context.abort(status_for(exc), str(exc))
    except Exception:
        log.exception("gRPC call failed on an unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (details in the server log)")


class BULServicer(bul_pb2_grpc.BULServiceServicer):
    def __init__(self, engine: UltraAdaptiveKVCacheEngine) -> None:
        self.engine = engine

    async def ProcessQuery(
        self, request: bul_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> bul_pb2.QueryResponse:
        async with engine_errors(context):
            return result_to_response(await self.engine.process_request(request_to_engine(request)))

    async def StreamQuery(
        self, request: bul_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[bul_pb2.TokenChunk, None]:
        # A client that goes away cancels this call; closing the engine's stream then (not whenever
        # it is garbage collected) stops the generation on the model thread at once.
        async with (
            engine_errors(context),
            aclosing(self.engine.stream_request(request_to_engine(request))) as events,
        ):
            async for event in events:
                if event.get("done"):
                    yield bul_pb2.TokenChunk(response=result_to_response(event))
                elif event.get(LOGPROBS_FIELD):
                    yield bul_pb2.TokenChunk(
                        token=event["token"], logprobs=logprobs_to_proto(event[LOGPROBS_FIELD])
                    )
                else:
                    yield bul_pb2.TokenChunk(token=event["token"])

    async def GetStats(
        self, request: bul_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> bul_pb2.StatsResponse:
        async with engine_errors(context):
            return stats_to_response(self.engine.get_stats())

"""Registering `BULService` on a server so that bytes which are not a valid request get
INVALID_ARGUMENT, like any other bad input.

The generated `add_BULServiceServicer_to_server` decodes requests with `Message.FromString` inside
grpc: bytes that do not parse (invalid UTF-8 in a string field, garbage, a truncated message) raise
there, before any servicer code runs, and the client sees UNKNOWN. Here each method gets the same
handler, built from the service's descriptor (so a method added to the proto is registered too), but
with a decoder that hands the servicer an `Undecodable` marker instead of raising; the wrapper
answers it INVALID_ARGUMENT with the parser's reason and never calls the servicer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from bulk.grpc_service.generated import bul_pb2

SERVICE = bul_pb2.DESCRIPTOR.services_by_name["BULService"]
# Trailing metadata naming the offending field on INVALID_ARGUMENT (here: the whole request).
FIELD_METADATA_KEY = "bul-field"


@dataclass(frozen=True)
class Undecodable:
    """What the decoder returns for bytes that are not a valid `type_name`."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"request: not a valid {self.type_name} message ({self.reason})"


def _decoder(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc))

    return decode


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        request.message,
        trailing_metadata=((FIELD_METADATA_KEY, "request"),),
    )


def _unary(behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return await behaviour(request, context)

    return handle


def _streaming(
    behaviour: Callable[[Any, Any], AsyncGenerator[Any, None]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        # Closed with the call, so that a cancelled stream stops the servicer's generation at once.
        async with aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                yield response

    return handle


def add_bul_service(servicer: Any, server: grpc.aio.Server) -> None:
    """`add_BULServiceServicer_to_server`, with undecodable requests answered INVALID_ARGUMENT."""
    handlers = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not wired here")
        request_class = getattr(bul_pb2, method.input_type.name)
        response_class = getattr(bul_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        options = {
            "request_deserializer": _decoder(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_streaming(behaviour), **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behaviour), **options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)

"""A request whose client has gone stops: the engine drops it at its next step, as vLLM aborts on a
disconnect, instead of decoding up to `max_new_tokens` for no one.

Streaming answers get this from Starlette (a `StreamingResponse` listens for the disconnect and closes
the token stream, which cancels the generation). A plain answer is awaited in the route itself, and
Starlette never tells it that its client left, so `until_disconnected` watches for it: once the engine
call really waits (an answer from the response cache never does, and costs the hot path no task), a
task awaits the ASGI `http.disconnect` message and cancels the waiting route. The cancellation
reaches the engine's future, which retires the request at its next step (its KV range free, no
answer stored), and the route answers 499 to no one (`ClientDisconnectedError`, logged at info
level, not as an error)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Generator
from typing import Any, Generic, TypeVar, cast

from starlette.requests import Request
from starlette.types import Receive

from bulk.errors import BulError

log = logging.getLogger(__name__)

T = TypeVar("T")

# nginx's "client closed request": the answer no one reads, in the access log.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnectedError(BulError):
    """The client closed its connection before its answer was ready; its request was cancelled."""


def until_disconnected(request: Request, work: Awaitable[T]) -> Awaitable[T]:
    """`await until_disconnected(request, work)`: `await work`, cancelled if `request`'s client
    disconnects meanwhile (then `ClientDisconnectedError`). The body must have been read already: the
    watch reads what `receive` brings next, which for a complete request is only the disconnect."""
    return _Watched(request, work)


class _Watched(Generic[T]):
    """`work`, awaited step by step so that the watch starts only once it really waits: an answer
    ready at once (the response cache) is returned from its first step, with no task, no callback
    (a fraction of a microsecond, where scheduling a callback cost the hot path 2 us)."""

    __slots__ = ("request", "work")

    def __init__(self, request: Request, work: Awaitable[T]) -> None:
        self.request = request
        self.work = work

    def __await__(self) -> Generator[Any, Any, T]:
        steps = self.work.__await__()
        try:
            waiting = steps.send(None)
        except StopIteration as ready:
            return cast(T, ready.value)
        task = asyncio.current_task()
        if task is None:  # not in a task (cannot happen under an ASGI server): nothing to cancel
            return (yield from _rest(steps, waiting))
        watch = _Watch(self.request.receive, task)
        watch.start()
        try:
            return (yield from _rest(steps, waiting))
        except asyncio.CancelledError:
            # Ours, and nobody else's (a server shutting down cancels too: that one goes on).
            if watch.fired and task.uncancel() == 0:
                request = self.request
                log.info("client of %s %s disconnected: request cancelled", request.method, request.url.path)
                raise ClientDisconnectedError("the client disconnected before the answer") from None
            raise
        finally:
            # Synchronously after `work` ends: the watch cannot cancel anything from now on.
            watch.done = True
            watch.stop()


def _rest(steps: Generator[Any, Any, T], waiting: Any) -> Generator[Any, Any, T]:
    """`yield from steps` for an iterator already started (it yielded `waiting`): what the task sends
    or throws in (its cancellation, say) goes on to `steps`, as `yield from` would (PEP 380)."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:
            try:
                waiting = steps.throw(exc)
            except StopIteration as done:
                return cast(T, done.value)
        else:
            try:
                waiting = steps.send(sent)
            except StopIteration as done:
                return cast(T, done.value)


class _Watch:
    """Awaits the disconnect of one request and then cancels the task waiting for its answer."""

    __slots__ = ("done", "fired", "receive", "target", "waiter")

    def __init__(self, receive: Receive, target: asyncio.Task[object]) -> None:
        self.receive = receive
        self.target = target
        self.done = False
        self.fired = False
        self.waiter: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.waiter = asyncio.get_running_loop().create_task(self._wait())

    def stop(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()

    async def _wait(self) -> None:
        try:
            while (await self.receive())["type"] != "http.disconnect":
                pass  # the rest of a body the route did not read: not our business
        except Exception:  # a server whose `receive` fails here: stop watching, the request goes on
            log.debug("cannot watch for the client's disconnect", exc_info=True)
            return
        if not self.done:
            self.fired = True
            self.target.cancel()

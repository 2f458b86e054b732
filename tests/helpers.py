"""Helpers the tests share: waiting for a condition instead of hand-written polling loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """Call `condition` until it returns something truthy, and return that; fail the test (an
    `AssertionError` saying what was awaited) after `timeout` seconds. An exception raised by
    `condition` propagates at once: a broken check is not something to wait out."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or condition!r}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """`wait_until` on an event loop: `condition` may be a coroutine function; the loop keeps running
    between checks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or condition!r}")
        await asyncio.sleep(interval)

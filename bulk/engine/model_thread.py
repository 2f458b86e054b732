"""The model thread: one thread that owns the model and runs jobs from a priority queue.

Model work must stay off the event loop, and a model on one device gains nothing from two threads
racing for it, so one thread runs jobs one at a time: higher `priority` first, FIFO within a priority
(a monotonic sequence number breaks ties). The engine's step loop is such a job (it runs steps while
it has work, then returns); loading the model and warming up are others. Engines and benchmarks that
share a model share its thread: their jobs take turns."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from bulk.errors import EngineClosedError

log = logging.getLogger(__name__)

_STOP = object()


class ModelThread:
    def __init__(self, name: str = "bul-model-thread") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any, Future[Any] | None]] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._name = name

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not the one running)."""
        return self._queue.qsize()

    @property
    def is_current(self) -> bool:
        """True when called from this thread (a job)."""
        return self._thread is not None and self._thread is threading.current_thread()

    def submit(self, job: Callable[[], Any], priority: int = 1) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if self._thread is None:
                # Started on first use, so constructing an engine (at import time, as the guide does)
                # costs nothing.
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((-priority, next(self._sequence), job, future))
        return future

    def _serve(self) -> None:
        while True:
            _, _, job, future = self._queue.get()
            if job is _STOP:
                return
            assert future is not None
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up while the job waited
            try:
                result = job()
            except BaseException as exc:  # the job's error belongs to its caller, not to the thread
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            # Fail what is still waiting, then stop the thread after the job in hand.
            while True:
                try:
                    _, _, _, future = self._queue.get_nowait()
                except queue.Empty:
                    break
                if future is not None and not future.done():
                    future.set_exception(EngineClosedError("the engine was shut down"))
            if thread is not None:
                self._queue.put((-(2**63), next(self._sequence), _STOP, None))
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

"""The in-process registry behind `POST /api/batch` and `GET /api/task/{id}`.

Each query of a batch becomes an asyncio task on the server's event loop (the engine queues it for the
model); its status dict has the shape Celery task status has (`task_id`, `status`, `result`/`error`),
so clients read both alike. The registry is bounded: when full, the oldest finished tasks are
forgotten first; when every entry is still running, new batches are refused (429) rather than growing
without end."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Any

from bulk.engine.protocol import ServingEngine
from bulk.errors import BulError

log = logging.getLogger(__name__)


class RegistryFullError(Exception):
    """Too many tasks are still running to accept more."""


class TaskRegistry:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._tasks: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._running: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> dict[str, Any] | None:
        status = self._tasks.get(task_id)
        return dict(status) if status is not None else None

    def submit(self, engine: ServingEngine, queries: list[dict[str, Any]]) -> list[str]:
        """Start one task per query; returns their ids at once."""
        self._make_room(len(queries))
        ids = []
        for query in queries:
            task_id = uuid.uuid4().hex
            self._tasks[task_id] = {"task_id": task_id, "status": "processing"}
            task = asyncio.create_task(self._run(engine, task_id, query), name=f"bul-task-{task_id}")
            # Keep a reference: the event loop holds tasks only weakly.
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            ids.append(task_id)
        return ids

    async def _run(self, engine: ServingEngine, task_id: str, query: dict[str, Any]) -> None:
        try:
            result = await engine.process_request(query)
        except BulError as exc:
            self._finish(task_id, {"status": "failed", "error": str(exc)})
        except Exception as exc:
            log.exception("batch task %s failed", task_id)
            self._finish(task_id, {"status": "failed", "error": type(exc).__name__})
        else:
            self._finish(task_id, {"status": "completed", "result": result})

    def _finish(self, task_id: str, update: dict[str, Any]) -> None:
        status = self._tasks.get(task_id)
        if status is not None:  # it may have been forgotten meanwhile
            status.update(update)

    def _make_room(self, needed: int) -> None:
        if needed > self.capacity:
            raise RegistryFullError(f"a batch may hold at most {self.capacity} queries")
        excess = len(self._tasks) + needed - self.capacity
        if excess <= 0:
            return
        finished = [tid for tid, s in self._tasks.items() if s["status"] != "processing"][:excess]
        if len(finished) < excess:
            raise RegistryFullError("too many batch tasks are still running; retry later")
        for task_id in finished:
            del self._tasks[task_id]

    async def aclose(self) -> None:
        """Cancel tasks still running (server shutdown)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

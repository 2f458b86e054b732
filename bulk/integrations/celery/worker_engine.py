"""The engine of one Celery worker process: built once when the process starts, shut down when it stops.

Prefork children and the solo pool send `worker_process_init`, so the model is loaded (and warmed up)
before the process takes its first task; the alive timeout in `app.py` gives it the time. Pools that
send no such signal (threads) build the engine on the first task instead, under a lock. The engine
is imported only here, inside functions, so the prefork parent never loads torch state it would fork."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import signals

from bulk.integrations.celery.settings import engine_config

if TYPE_CHECKING:
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

log = logging.getLogger(__name__)

_engine: UltraAdaptiveKVCacheEngine | None = None
_lock = threading.Lock()


def get_engine() -> UltraAdaptiveKVCacheEngine:
    """This process's engine, building it if the pool sent no start signal."""
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                from bulk.engine.engine import UltraAdaptiveKVCacheEngine

                config = engine_config()
                log.info("building the engine (model %s) in this worker process", config.model)
                engine = UltraAdaptiveKVCacheEngine(config)
                engine.warmup_sync()
                _engine = engine
    return _engine


def stop_engine() -> None:
    global _engine
    with _lock:
        engine, _engine = _engine, None
    if engine is not None:
        log.info("shutting the engine down")
        engine.shutdown()


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # A failure here is logged by Celery's signal dispatch and the process keeps running; its tasks
    # then retry building the engine through get_engine() and fail with the load error.
    get_engine()


@signals.worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    stop_engine()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    # The solo and threads pools run tasks in the main process, which gets no worker_process_shutdown.
    stop_engine()

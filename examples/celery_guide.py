# Changed from the guide: broker/backend URLs read (with `import os`) from BUL_BROKER_URL / BUL_RESULT_BACKEND
# (URLs come from configuration, never code; same defaults); the "Uso desde FastAPI" part imports from this file instead of
# `celery_app` and creates the `app = FastAPI()` it assumes.
# ruff: noqa
# fmt: off
# (lint and format are off: the code below is kept as the guide writes it)
"""The integration guide's Celery sample: `celery -A examples.celery_guide:celery_app worker --pool=solo`.
The engine is built in whichever process configures the app first and loads its model on the first task;
for production use `bul worker` (bulk.integrations.celery), which loads and warms it as each worker process
starts, and retries with back-off instead of a fixed 60 s."""

import os

from celery import Celery
from fastapi import FastAPI

from bulk.core.ultra_adaptive_kv_cache_engine import (
    UltraAdaptiveKVCacheEngine,
    KVCacheConfig
)

celery_app = Celery(
    'bul_tasks',
    broker=os.environ.get('BUL_BROKER_URL', 'redis://localhost:6379/0'),
    backend=os.environ.get('BUL_RESULT_BACKEND', 'redis://localhost:6379/0'),
)

# Inicializar engine una vez
cache_config = KVCacheConfig(max_tokens=8192)
cache_engine = None

@celery_app.on_after_configure.connect
def setup_engine(sender, **kwargs):
    """Inicializar engine en worker."""
    global cache_engine
    cache_engine = UltraAdaptiveKVCacheEngine(cache_config)

@celery_app.task(bind=True, max_retries=3)
def process_document_task(self, query_data):
    """Task para procesar documento."""
    try:
        result = cache_engine.process_request_sync(query_data)
        return result
    except Exception as e:
        # Retry con backoff
        raise self.retry(exc=e, countdown=60)

@celery_app.task
def batch_process_task(queries):
    """Task para procesar batch."""
    results = []
    for query in queries:
        result = cache_engine.process_request_sync(query)
        results.append(result)
    return results


# ---- Uso desde FastAPI ------------------------------------------------------------------------------
app = FastAPI()

@app.post("/api/process")
async def process_document(query: dict):
    """Enviar a Celery para procesar."""
    task = process_document_task.delay(query)
    return {"task_id": task.id}

@app.get("/api/task/{task_id}")
async def get_task_status(task_id: str):
    """Obtener estado de task."""
    task = process_document_task.AsyncResult(task_id)

    if task.ready():
        return {
            "status": "completed",
            "result": task.result
        }
    return {"status": "processing"}

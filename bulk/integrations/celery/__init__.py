"""Celery integration: the `bul_tasks` app (`bulk.integrations.celery.app`), its tasks
(`bulk.integrations.celery.tasks`) and the `bul worker` command (`bulk.integrations.celery.cli`). The
FastAPI routes that enqueue work and report task status are a server feature: `bulk.server.celery_routes`.

This package's own `__init__` imports nothing, so `bul` can find the `worker` command without
importing Celery."""

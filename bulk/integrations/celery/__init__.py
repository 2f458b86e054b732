"""Celery integration: the `bul_tasks` app (`bulk.integrations.celery.app`), its tasks
(`bulk.integrations.celery.tasks`), the `bul worker` command (`bulk.integrations.celery.cli`) and a
FastAPI router that enqueues work and reports task status (`bulk.integrations.celery.router`).

This package's own `__init__` imports nothing, so `bul` can find the `worker` command without
importing Celery."""

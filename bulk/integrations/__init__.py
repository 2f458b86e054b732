"""Thin shims that run the engine inside other frameworks: Celery workers, Django and Flask apps.

Each subpackage imports its framework, so nothing here is imported by the engine core; import the one
you use (`bulk.integrations.celery.app`, `bulk.integrations.django`, `bulk.integrations.flask`).
Ray Serve (`bul cluster`) is `bulk.cluster`, a shim above the server: nothing here imports the server
or the cluster (import-linter's contracts in `pyproject.toml`), since the server imports the Celery app."""

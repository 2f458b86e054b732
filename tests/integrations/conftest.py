"""Fixtures for the integration tests: a real Celery worker (`bul worker`) on the real Redis, database 13.

The worker is a subprocess started once per test module that needs it and always killed at the end;
the database is flushed before and after."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = "redis://127.0.0.1:6379/13"
READY_TIMEOUT_S = 90


def worker_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "BUL_BROKER_URL": BROKER_URL,
        "BUL_RESULT_BACKEND": BROKER_URL,
        "BUL_MODEL": "demo",
        "BUL_DEVICE": "cpu",
        "BUL_DEFAULT_MAX_NEW_TOKENS": "4",
        # Small back-off so retry tests take a fraction of a second; production default is 2 s.
        "BUL_RETRY_BACKOFF": "0.05",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def redis13() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def start_worker(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a worker and wait until it logs `ready.`; raise with its log if it does not."""
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    log_file.close()
    # A worker that exited is done waiting too: the check below tells which it was.
    with contextlib.suppress(AssertionError):
        wait_until(
            lambda: " ready." in log_path.read_text(errors="replace") or proc.poll() is not None,
            READY_TIMEOUT_S,
            0.2,
            "the worker",
        )
    if " ready." in log_path.read_text(errors="replace") and proc.poll() is None:
        return proc
    stop_worker(proc)
    raise RuntimeError(f"worker did not become ready:\n{log_path.read_text(errors='replace')[-4000:]}")


def stop_worker(proc: subprocess.Popen) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL of the whole process group if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def bul_worker(redis13, tmp_path_factory) -> Iterator[Path]:
    """`bul worker` (prefork, one child: the engine is built in worker_process_init) with the test-only
    tasks. Yields the worker's log file."""
    from bulk.integrations.celery.app import bul_tasks

    # This process sends tasks through the same app; point it at database 13 before first use.
    bul_tasks.conf.update(broker_url=BROKER_URL, result_backend=BROKER_URL)
    # If another test used the app first, its cached connections would still point elsewhere: fail
    # loudly rather than send test tasks to another database.
    assert bul_tasks.conf.broker_url == BROKER_URL
    assert bul_tasks.backend.connparams["db"] == 13
    assert bul_tasks.connection_for_write().as_uri().endswith("/13")
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    argv = [
        # This interpreter, not a path into one virtual environment: `bul worker` as installed.
        sys.executable,
        "-m",
        "bulk.cli.main",
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        "--loglevel=info",
        "--hostname=bul-test@%h",
        "--include=tests.integrations.celery_test_tasks",
    ]
    proc = start_worker(argv, log_path, worker_env())
    try:
        yield log_path
    finally:
        stop_worker(proc)


@pytest.fixture(scope="session")
def django_settings(tmp_path_factory):
    """Django configured once for the session (it can only be configured once per process): the packaged
    app and the guide's sample app, both from the guide's BUL_CACHE_CONFIG with model "demo" and a
    temporary persistence path."""
    import runpy

    import django
    from django.conf import settings

    if not settings.configured:
        guide_dir = ROOT / "examples" / "django_guide"
        sys.path.insert(0, str(guide_dir))  # the guide's code imports `apps.bul_integration`
        guide = runpy.run_path(str(guide_dir / "settings.py"))
        cache_config = {
            **guide["BUL_CACHE_CONFIG"],
            "model": "demo",
            "persistence_path": str(tmp_path_factory.mktemp("django-kv")),
        }
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tests-only-not-secret",
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF="tests.integrations.django_urls",
            INSTALLED_APPS=["bulk.integrations.django", "apps.bul_integration"],
            MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
            DATABASES={},
            BUL_CACHE_CONFIG=cache_config,
        )
        django.setup()
    return settings

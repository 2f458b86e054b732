"""The model thread: jobs by priority, FIFO within one; failures and shutdown."""

from __future__ import annotations

import threading

import pytest

from bulk.engine.model_thread import ModelThread
from bulk.errors import EngineClosedError


def test_higher_priority_first_fifo_within_a_priority():
    worker, gate, started, order = ModelThread(), threading.Event(), threading.Event(), []
    worker.submit(
        lambda: (started.set(), gate.wait()), priority=0
    )  # holds the thread while the rest queue up
    assert started.wait(5)
    futures = [
        worker.submit(lambda n=n: order.append(n), priority=p)
        for n, p in [("a", 1), ("b", 3), ("c", 1), ("d", 3), ("e", 2)]
    ]
    assert worker.queue_depth == 5
    gate.set()
    for f in futures:
        f.result(timeout=5)
    assert order == ["b", "d", "e", "a", "c"]
    worker.shutdown()


def test_a_failing_job_does_not_stop_the_thread():
    worker = ModelThread()
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(timeout=5)
    assert worker.submit(lambda: 7).result(timeout=5) == 7
    worker.shutdown()


def test_shutdown_fails_queued_jobs_and_refuses_new_ones():
    worker, gate, started = ModelThread(), threading.Event(), threading.Event()
    running = worker.submit(lambda: (started.set(), gate.wait())[1])
    assert started.wait(5)
    queued = worker.submit(lambda: "never")
    threading.Timer(0.2, gate.set).start()
    worker.shutdown()
    assert running.result(timeout=5) is True
    with pytest.raises(EngineClosedError):
        queued.result(timeout=5)
    with pytest.raises(EngineClosedError):
        worker.submit(lambda: None)


def test_cancelled_job_is_skipped():
    worker, gate, started, ran = ModelThread(), threading.Event(), threading.Event(), []
    worker.submit(lambda: (started.set(), gate.wait()))
    assert started.wait(5)
    skipped = worker.submit(lambda: ran.append(1))
    assert skipped.cancel()
    gate.set()
    worker.submit(lambda: None).result(timeout=5)
    assert ran == []
    worker.shutdown()

"""The scheduler alone, on sequences that never touch a model: admission by priority within both
limits, head-of-line order, chunk budgets, cancellation."""

from __future__ import annotations

from bulk.config import KVCacheConfig
from bulk.engine.request import parse_request
from bulk.engine.scheduler import Scheduler
from bulk.engine.sequence import Sequence, Status
from bulk.models.tokenizer import ByteTokenizer


def _seq(prompt_tokens: int, max_new: int = 8, priority: int = 1) -> Sequence:
    request = parse_request({"query": "x", "priority": priority}, KVCacheConfig())
    seq = Sequence(request, 0.0)
    seq.start([0] * prompt_tokens, max_new, ByteTokenizer())
    return seq


def test_admission_follows_priority_then_arrival():
    scheduler = Scheduler(max_batch_size=2, max_batch_tokens=1000, prefill_chunk_tokens=64)
    low, high, mid, high2 = (
        _seq(10, priority=1),
        _seq(10, priority=9),
        _seq(10, priority=5),
        _seq(10, priority=9),
    )
    for seq in (low, high, mid, high2):
        scheduler.add(seq)
    step = scheduler.schedule()
    assert step.admitted == [high, high2] and step.prefill is high
    scheduler.finish(high)
    assert scheduler.schedule().admitted == [mid]


def test_the_head_of_the_queue_is_never_skipped():
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=100, prefill_chunk_tokens=64)
    running = _seq(50, max_new=10)
    scheduler.add(running)
    scheduler.schedule()
    big, small = _seq(60, max_new=10), _seq(5, max_new=5)
    scheduler.add(big)
    scheduler.add(small)
    # 40 tokens are free: `small` would fit, but `big` is first in line.
    assert scheduler.schedule().admitted == []
    scheduler.finish(running)
    assert scheduler.schedule().admitted == [big, small]
    assert scheduler.kv_tokens_in_use == 80


def test_a_prompt_is_chunked_only_while_others_decode():
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=1000, prefill_chunk_tokens=64)
    first = _seq(300)
    scheduler.add(first)
    step = scheduler.schedule()
    assert step.prefill is first and step.prefill_budget is None  # alone: all of it
    first.status = Status.DECODE
    second = _seq(300)
    scheduler.add(second)
    step = scheduler.schedule()
    assert step.prefill is second and step.prefill_budget == 64 and step.decode == [first]
    always = Scheduler(max_batch_size=8, max_batch_tokens=1000, prefill_chunk_tokens=64, always_chunk=True)
    always.add(_seq(300))
    assert always.schedule().prefill_budget == 64


def test_cancelled_requests_leave_the_queue_and_the_batch():
    scheduler = Scheduler(max_batch_size=1, max_batch_tokens=1000, prefill_chunk_tokens=64)
    running, waiting = _seq(10), _seq(10)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    running.cancel()
    waiting.cancel()
    gone_waiting, gone_running = scheduler.take_cancelled()
    assert gone_waiting == [waiting] and gone_running == [running]
    assert scheduler.waiting == [] and scheduler.running == [running]  # freed by `finish`
    scheduler.finish(running)
    assert not scheduler.has_work and scheduler.kv_tokens_in_use == 0

"""The scheduler alone, on sequences that never touch a model: admission by priority within both
limits, head-of-line order, chunk budgets, cancellation."""

from __future__ import annotations

from bulk.config import KVCacheConfig
from bulk.engine.request import parse_request
from bulk.engine.scheduler import MIN_CHUNK, Scheduler
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
    assert step.admitted == [high, high2] and step.prefill == [(high, 10), (high2, 10)]
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


def test_prompt_budget_alone_beside_decode_and_invariant():
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=10_000, prefill_chunk_tokens=64)
    first = _seq(3000)
    scheduler.add(first)
    step = scheduler.schedule()
    assert step.prefill == [(first, 3000)]  # alone: all of it, even past PREFILL_STEP_TOKENS
    first.status = Status.DECODE
    second, third = _seq(300), _seq(20)
    scheduler.add(second)
    scheduler.add(third)
    step = scheduler.schedule()
    # Nothing measured yet: the configured chunk, for the oldest prompt first.
    assert step.prefill == [(second, 64)] and step.decode == [first]
    # A decode step costs 20 ms and a prompt token 1 ms: 1.5 decode steps' worth is 30 tokens.
    scheduler.observe_step(0, 1, 0.020)
    scheduler.observe_step(100, 0, 0.100)
    assert scheduler.schedule().prefill == [(second, 30)]
    scheduler.observe_step(10, 0, 1.0)  # very slow tokens: never below MIN_CHUNK
    assert scheduler.schedule().prefill == [(second, MIN_CHUNK)]
    # With nothing decoding, several prompts share one step's budget.
    first.status = Status.FINISHED
    scheduler.running.remove(first)
    assert scheduler.schedule().prefill == [(second, 300), (third, 20)]

    invariant = Scheduler(
        max_batch_size=8, max_batch_tokens=10_000, prefill_chunk_tokens=64, always_chunk=True
    )
    a, b = _seq(300), _seq(20)
    invariant.add(a)
    invariant.add(b)
    step = invariant.schedule()
    assert step.separate and step.prefill == [(a, 64)]  # one prompt, exactly one chunk, alone or not


def test_prompts_that_may_share_a_prefix_are_prefilled_one_after_another():
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=10_000, prefill_chunk_tokens=64)
    a, b, c = _seq(40), _seq(40), _seq(40)
    a.prefix_key = b.prefix_key = b"system prompt block"
    c.prefix_key = b"another"
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.schedule().prefill == [(a, 40), (c, 40)]  # b waits for a's blocks
    a.hit = object()  # a's prefill has started (its lookup is done), its prompt not finished
    assert [s for s, _ in scheduler.schedule().prefill] == [a, c]
    a.status = Status.DECODE  # a's prompt is done and stored: b may look it up now
    assert [s for s, _ in scheduler.schedule().prefill] == [b, c]


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

"""The scheduler alone, on sequences that never touch a model: admission by priority within both
limits, head-of-line order, chunk budgets, cancellation."""

from __future__ import annotations

from bulk.config import KVCacheConfig
from bulk.engine.request import parse_request
from bulk.engine.scheduler import MIN_CHUNK, PROMPT_STALL_SECONDS, WAIT_FROM_TOKENS, Scheduler
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
    # A decode step costs 200 ms and a prompt token 10 ms: 1.5 decode steps' worth is 30 tokens.
    scheduler.observe_step(0, 1, 0.200)
    scheduler.observe_step(100, 0, 1.0)
    assert scheduler.schedule().prefill == [(second, 30)]
    # A fast decode step (20 ms; a token 2 ms): PROMPT_STALL_SECONDS' worth, 50 tokens, not 15.
    fast = Scheduler(max_batch_size=8, max_batch_tokens=10_000, prefill_chunk_tokens=64)
    fast.observe_step(0, 1, 0.020)
    fast.observe_step(100, 0, 0.200)
    assert fast.chunk_beside_decode() == int(PROMPT_STALL_SECONDS / 0.002) == 50
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


class _Cache:
    """The prefix cache as the scheduler sees it: which block hashes exist now."""

    block_size = 16

    def __init__(self) -> None:
        self.blocks: set[bytes] = set()

    def cached_blocks(self, hashes) -> int:
        n = 0
        for digest in hashes:
            if digest not in self.blocks:
                break
            n += 1
        return n


def _chain(*names: str) -> tuple[bytes, ...]:
    """Block hashes of a prompt: each block named by its whole prefix, as chained hashes are."""
    return tuple("/".join(names[: i + 1]).encode() for i in range(len(names)))


def _sharing_scheduler(cache: _Cache, chunk: int = 64) -> Scheduler:
    return Scheduler(max_batch_size=8, max_batch_tokens=10_000, prefill_chunk_tokens=chunk, prefix=cache)


def test_a_request_waits_for_blocks_a_prefill_under_way_computes_and_only_until_they_exist():
    cache = _Cache()
    scheduler = _sharing_scheduler(cache)
    system = ("s1", "s2", "s3", "s4")  # 64 tokens of a system prompt nobody computed yet
    a, b, c = _seq(80), _seq(80), _seq(80)
    a.block_hashes = _chain(*system, "a")
    b.block_hashes = _chain(*system, "b")
    c.block_hashes = _chain("other", "c1", "c2", "c3", "c4")
    for seq in (a, b, c):
        scheduler.add(seq)
    # a starts; b would compute a's 64 uncached tokens again: it waits; c shares nothing.
    assert [s for s, _ in scheduler.schedule().prefill] == [a, c]
    a.hit = c.hit = object()  # their lookups ran with that step's forward
    a.num_computed = 32  # a's first chunk: two of the four shared blocks exist
    cache.blocks |= set(a.block_hashes[:2])
    assert [s for s, _ in scheduler.schedule().prefill] == [a, c]  # b still waits for two
    a.num_computed = 64  # the shared blocks exist now, though a's prompt is not done
    cache.blocks |= set(a.block_hashes[:4])
    step = scheduler.schedule()
    assert [s for s, _ in step.prefill] == [a, b, c]  # admission order
    assert step.prefill[1] == (b, 80 - 64)  # b's budget counts only what its lookup will not find


def test_nothing_waits_on_a_cached_header_and_short_shared_parts_are_computed_twice():
    cache = _Cache()
    scheduler = _sharing_scheduler(cache)
    header = ("template header",)
    cache.blocks.add(_chain(*header)[0])  # cached by an earlier request
    first, second = _seq(48), _seq(48)
    first.block_hashes = _chain(*header, "q1", "q1b")
    second.block_hashes = _chain(*header, "q2", "q2b")
    scheduler.add(first)
    scheduler.add(second)
    # They share only the cached header: both start in the same step, each computing its own rest.
    assert scheduler.schedule().prefill == [(first, 48 - 16), (second, 48 - 16)]

    # Uncached, a 16-token shared part is below the default threshold: computed twice, no wait.
    scheduler = _sharing_scheduler(_Cache())
    x, y = _seq(48), _seq(48)
    x.block_hashes = _chain("short", "x1", "x2")
    y.block_hashes = _chain("short", "y1", "y2")
    scheduler.add(x)
    scheduler.add(y)
    assert [s for s, _ in scheduler.schedule().prefill] == [x, y]


def test_whether_to_wait_follows_the_measured_costs():
    scheduler = _sharing_scheduler(_Cache())
    assert not scheduler.worth_waiting(WAIT_FROM_TOKENS - 1) and scheduler.worth_waiting(WAIT_FROM_TOKENS)
    scheduler.observe_step(0, 4, 0.040)  # a decode step: 40 ms
    scheduler.observe_step(1000, 0, 1.0)  # a prompt token: 1 ms
    assert not scheduler.worth_waiting(39) and scheduler.worth_waiting(40)  # 40 tokens cost a step


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

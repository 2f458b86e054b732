"""The scheduler: which requests wait, which run, and what each step computes. No tensors.

    waiting   a heap: higher priority first, FIFO within a priority
    running   admitted requests in admission order: prefilling, then decoding

A step admits waiting requests while both limits hold: at most `max_batch_size` running, and each
one's KV range (prompt + max_new_tokens, reserved whole at admission, as mini-sglang does) fits in
the `max_batch_tokens` pool. Because every running request already holds all the KV it can ever
need, nothing is ever preempted. Admission is strictly in priority order: when the head of the
queue does not fit, nothing behind it jumps ahead (a long prompt is never starved by short ones).

Then the step computes at most one prefill chunk, for the oldest admitted request whose prompt is
not done, and one decode token for every request past its prompt. While others decode, the chunk is
`prefill_chunk_tokens`, so their next token waits for one chunk rather than a whole long prompt; a
request prefilling alone runs its prompt in one go (in batch-invariant mode it is always chunked,
so a prompt is computed the same way whatever runs beside it). Prompts are computed one at a time:
a request's prefix lookup happens when its prefill starts, after the requests ahead of it have
stored their prompt blocks, so requests arriving together still share a common system prompt."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from bulk.engine.sequence import Sequence, Status
from bulk.kv.slots import SlotAllocator


@dataclass
class ScheduledStep:
    admitted: list[Sequence] = field(default_factory=list)
    prefill: Sequence | None = None
    prefill_budget: int | None = None  # tokens of its prompt to compute now; None: all of them
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        max_batch_size: int,
        max_batch_tokens: int,
        prefill_chunk_tokens: int,
        always_chunk: bool = False,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.always_chunk = always_chunk
        self.slots = SlotAllocator(max_batch_tokens)
        self.waiting: list[tuple[int, int, Sequence]] = []  # (-priority, arrival, sequence)
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a request whose prompt is tokenized (its `capacity` known)."""
        if seq.capacity > self.slots.capacity:
            raise ValueError(f"needs {seq.capacity} KV tokens; the pool holds {self.slots.capacity}")
        heapq.heappush(self.waiting, (-seq.priority, seq.arrival, seq))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_tokens_in_use(self) -> int:
        return self.slots.used

    def take_cancelled(self) -> tuple[list[Sequence], list[Sequence]]:
        """The cancelled requests: (waiting ones, now dequeued; running ones, still holding their KV
        range until `finish`)."""
        waiting: list[Sequence] = []
        if any(s.cancelled for _, _, s in self.waiting):
            waiting = [s for _, _, s in self.waiting if s.cancelled]
            self.waiting = [entry for entry in self.waiting if not entry[2].cancelled]
            heapq.heapify(self.waiting)
        return waiting, [s for s in self.running if s.cancelled]

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0][2]
            start = self.slots.allocate(seq.capacity)
            if start is None:
                break  # wait for a running request to finish; never skip the head of the queue
            heapq.heappop(self.waiting)
            seq.slot, seq.status = start, Status.PREFILL
            self.running.append(seq)
            step.admitted.append(seq)

        step.decode = [s for s in self.running if s.status is Status.DECODE]
        step.prefill = next((s for s in self.running if s.status is Status.PREFILL), None)
        if step.prefill is not None and (step.decode or self.always_chunk):
            step.prefill_budget = self.prefill_chunk_tokens
        return step

    def finish(self, seq: Sequence) -> None:
        """Take a running request out and free its KV range."""
        self.running.remove(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED

    def drain_waiting(self) -> list[Sequence]:
        """Remove and return every waiting request (shutdown)."""
        waiting = [s for _, _, s in sorted(self.waiting)]
        self.waiting.clear()
        return waiting

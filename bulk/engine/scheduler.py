"""The scheduler: which requests wait, which run, and what each step computes. No tensors.

    waiting   a heap: higher priority first, FIFO within a priority
    running   admitted requests in admission order: prefilling, then decoding

A step admits waiting requests while both limits hold: at most `max_batch_size` running, and each
one's KV range (prompt + max_new_tokens, reserved whole at admission, as mini-sglang does) fits in
the `max_batch_tokens` pool. Because every running request already holds all the KV it can ever
need, nothing is ever preempted. Admission is strictly in priority order: when the head of the
queue does not fit, nothing behind it jumps ahead (a long prompt is never starved by short ones).

Then the step picks the model work of its one forward: one token for every request past its
prompt, and prompt tokens for the admitted requests still prefilling, oldest first, within a token
budget. With nothing decoding, the budget is `PREFILL_STEP_TOKENS` (or the whole first prompt, if
longer: a prompt alone runs in one go). While others decode, it is sized so that the prompt work
delays their next token by about `CHUNK_STALL` decode steps: the step loop reports what a prompt
token and a decode step cost (`observe_step`), and the budget is that many decode steps' worth of
prompt tokens, between `MIN_CHUNK` and `prefill_chunk_tokens`. Sarathi-Serve sizes its token budget
from the inter-token latency it allows in the same way; a fixed token count would stall a large
model's streams far longer than a small one's. In batch-invariant mode at most one prompt is
computed per step, in chunks of exactly `prefill_chunk_tokens` and in a forward of its own (the
loop runs the decode rows in another), so that a prompt is computed the same way whatever runs
beside it.

Requests that may share a prefix (their first blocks agree) are prefilled one after another: a
request's prefix lookup happens when its prefill starts, after the one ahead of it has stored its
prompt blocks, so requests arriving together still share a common system prompt."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from bulk.engine.sequence import Sequence, Status
from bulk.kv.slots import SlotAllocator

# A prefill chunk beside decoding requests costs about this many of their decode steps: their
# inter-token latency during a long prefill stays near (1 + CHUNK_STALL) times its usual value.
CHUNK_STALL = 1.5
MIN_CHUNK = 16  # tokens: a long prompt always progresses
# Prompt tokens a step computes when nothing decodes (more when the first prompt alone is longer).
PREFILL_STEP_TOKENS = 2048
_SMOOTHING = 0.3  # weight of the newest measurement in the running cost estimates


@dataclass
class ScheduledStep:
    admitted: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, prompt tokens now)
    decode: list[Sequence] = field(default_factory=list)
    separate: bool = False  # run the prefill and the decode rows in two forwards (batch invariance)


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
        self._prefill_seconds_per_token: float | None = None
        self._decode_step_seconds: float | None = None

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
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        if self.always_chunk:
            step.separate = True
            if prefilling:
                seq = prefilling[0]
                step.prefill = [(seq, min(seq.prompt_left, self.prefill_chunk_tokens))]
            return step
        if step.decode:
            budget = self.chunk_beside_decode()
        else:
            budget = max(PREFILL_STEP_TOKENS, prefilling[0].prompt_left) if prefilling else 0
        started = {s.prefix_key for s in prefilling if s.prefill_started and s.prefix_key is not None}
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.prefill_started and seq.prefix_key is not None:
                if seq.prefix_key in started:
                    continue  # after the request ahead with the same first block has stored it
                started.add(seq.prefix_key)
            take = min(seq.prompt_left, budget)
            step.prefill.append((seq, take))
            budget -= take
        return step

    def chunk_beside_decode(self) -> int:
        """Prompt tokens to compute in a step that also decodes (see the module's docstring)."""
        if self._prefill_seconds_per_token is None or self._decode_step_seconds is None:
            return self.prefill_chunk_tokens  # nothing measured yet
        tokens = int(CHUNK_STALL * self._decode_step_seconds / self._prefill_seconds_per_token)
        return max(min(MIN_CHUNK, self.prefill_chunk_tokens), min(tokens, self.prefill_chunk_tokens))

    def observe_step(self, prompt_tokens: int, decode_rows: int, seconds: float) -> None:
        """What one forward cost: the running estimates behind `chunk_beside_decode`. A forward
        that did both charges the prompt tokens what is left after a decode step's cost."""
        if prompt_tokens == 0:
            if decode_rows:
                self._decode_step_seconds = _smooth(self._decode_step_seconds, seconds)
            return
        prompt_seconds = seconds
        if decode_rows:
            if self._decode_step_seconds is None:
                return
            prompt_seconds = seconds - self._decode_step_seconds
            if prompt_seconds <= 0:
                return
        self._prefill_seconds_per_token = _smooth(
            self._prefill_seconds_per_token, prompt_seconds / prompt_tokens
        )

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


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - _SMOOTHING) * previous + _SMOOTHING * value

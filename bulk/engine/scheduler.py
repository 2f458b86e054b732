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
budget; several prompts share one forward. With nothing decoding, the budget is
`PREFILL_STEP_TOKENS` (or the whole first prompt, if longer: a prompt alone runs in one go). While
others decode, it is sized so that the prompt work delays their next token by `CHUNK_STALL` decode
steps or `PROMPT_STALL_SECONDS`, whichever is longer: the step loop reports what a prompt token and
a decode step cost (`observe_step`), and the budget is the prompt tokens that fit in that time,
between `MIN_CHUNK` and `prefill_chunk_tokens`. Sarathi-Serve sizes its token budget from the
inter-token latency it allows in the same way; a fixed token count would stall a large model's
streams far longer than a small one's. The floor in seconds is for small models: their decode step
is a few milliseconds, and a budget of 1.5 of those (a dozen prompt tokens) admitted new requests
more slowly than chat traffic arrives (a 200-token question every 32 decode steps per stream at
16 streams is 100 prompt tokens a step), so requests queued for their prompt while the batch ran
half empty. In batch-invariant mode at most one prompt is
computed per step, in chunks of exactly `prefill_chunk_tokens` and in a forward of its own (the
loop runs the decode rows in another), so that a prompt is computed the same way whatever runs
beside it.

Requests in flight share prefixes without queueing behind each other. A request's prefill starts
with its prefix lookup (`start`, the model runner's), which takes every block cached at that moment;
the blocks a prefill computes are stored as each chunk completes (`EngineLoop._forward`), not when
its whole prompt is done, as vLLM marks each full block cached the moment it is computed. So a
request waits only when a prefill already under way is computing blocks of its own prompt that are
not cached yet, and only until that prefill has passed them; then its lookup finds them. A prefix
already cached (a chat template's header, a system prompt seen before) costs no wait, and a short
shared part is computed twice rather than waited for: waiting costs at least one step, so it pays
only when computing the shared tokens again would cost more than a step (`worth_waiting`, from the
measured costs; SGLang's in-batch prefix caching waits only above a length threshold too)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from bulk.engine.sequence import Sequence, Status
from bulk.kv.slots import SlotAllocator

# A prefill chunk beside decoding requests costs about this many of their decode steps: their
# inter-token latency during a long prefill stays near (1 + CHUNK_STALL) times its usual value.
CHUNK_STALL = 1.5
# ...or by this long, when that is more: a stream still gets ten tokens a second, above reading
# speed, while new requests' prompts go through at the rate chat traffic brings them.
PROMPT_STALL_SECONDS = 0.1
MIN_CHUNK = 16  # tokens: a long prompt always progresses
# Prompt tokens a step computes when nothing decodes (more when the first prompt alone is longer).
# Small enough that a burst of prompts is admitted a few per step, the first of them streaming
# after one such step rather than all waiting for one long forward: 16 chat questions of 200 tokens
# arriving at once (SmolLM2, 2 threads) got their first token after a median 0.35-0.49 s at 512
# against 0.69 s at 2,048 (the 95th percentile 1.5 s against 1.2 s).
PREFILL_STEP_TOKENS = 512
_SMOOTHING = 0.3  # weight of the newest decode step in its running cost estimate
# The prompt token's cost is the prompt seconds over the prompt tokens of the recent forwards, each
# forward's share decaying by this much per later forward: weighted by tokens, so that a few short
# prompts, whose forwards are mostly fixed cost (the weights read once), do not make tokens look
# dear. Averaged per forward instead, a warmup's 20-token prompts (1.5 ms a token, SmolLM2) kept
# the estimate near 1.1 ms after a 2,048-token forward had shown 0.3 ms, and the budget beside
# decoding rows at 80 tokens where 300 fit the same time.
_PROMPT_DECAY = 0.8
# Before any step is measured, a request waits for an in-flight prefill's blocks from this many
# shared uncached tokens on (SGLang's in-batch prefix caching threshold).
WAIT_FROM_TOKENS = 32


class PrefixView(Protocol):
    """What the scheduler reads of the prefix cache: which blocks exist now (no pins, no tensors)."""

    block_size: int

    def cached_blocks(self, hashes: Seq[bytes]) -> int:
        """How many of `hashes`, a prompt's block chain from its start, are cached now."""
        ...


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
        prefix: PrefixView | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.prefix = prefix
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.always_chunk = always_chunk
        self.slots = SlotAllocator(max_batch_tokens)
        self.waiting: list[tuple[int, int, Sequence]] = []  # (-priority, arrival, sequence)
        self.running: list[Sequence] = []
        self._prefill_seconds_per_token: float | None = None
        self._prompt_seconds = 0.0  # decayed sums behind _prefill_seconds_per_token
        self._prompt_tokens = 0.0
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
            slot = self.slots.allocate(seq.capacity)
            if slot is None:
                break  # wait for a running request to finish; never skip the head of the queue
            heapq.heappop(self.waiting)
            seq.slot, seq.status = slot, Status.PREFILL
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
        under_way = [s for s in prefilling if s.prefill_started]
        budget = 0
        for seq in prefilling:
            if step.prefill and budget <= 0:
                break
            left = seq.prompt_left
            if not seq.prefill_started:
                cached = self._cached_blocks(seq)
                if self._waits_for(seq, cached, under_way):
                    continue  # until the prefill ahead has computed the blocks they share
                under_way.append(seq)  # its lookup runs with this step's forward
                # What the lookup will not find in memory (the model runner clips the chunk to
                # what it actually left: lower tiers may hold more).
                left -= min(cached * self._block_size, left - 1)
            if not step.prefill:
                budget = self.chunk_beside_decode() if step.decode else max(PREFILL_STEP_TOKENS, left)
            take = min(left, budget)
            step.prefill.append((seq, take))
            budget -= take
        return step

    @property
    def _block_size(self) -> int:
        return self.prefix.block_size if self.prefix is not None else 1

    def _cached_blocks(self, seq: Sequence) -> int:
        """How many of `seq`'s prompt blocks are in the memory tier now."""
        if self.prefix is None or not seq.block_hashes:
            return 0
        return self.prefix.cached_blocks(seq.block_hashes)

    def _waits_for(self, seq: Sequence, cached: int, under_way: list[Sequence]) -> bool:
        """Whether `seq`, whose first `cached` prompt blocks are cached, should not start yet: a
        prefill under way is computing blocks of its prompt that are not cached, and computing them
        again would cost more than waiting for them."""
        bs = self._block_size
        for other in under_way:
            shared = common_blocks(seq.block_hashes, other.block_hashes)
            if shared <= cached or other.num_computed >= shared * bs:
                continue  # nothing uncached shared, or computed (and stored) already
            if self.worth_waiting((shared - cached) * bs):
                return True
        return False

    def worth_waiting(self, tokens: int) -> bool:
        """Whether `tokens` of prompt cost more to compute than a step costs to wait: a request that
        waits for another's blocks starts at least one step later."""
        if self._prefill_seconds_per_token is None or self._decode_step_seconds is None:
            return tokens >= WAIT_FROM_TOKENS
        return tokens * self._prefill_seconds_per_token >= self._decode_step_seconds

    def chunk_beside_decode(self) -> int:
        """Prompt tokens to compute in a step that also decodes (see the module's docstring)."""
        if self._prefill_seconds_per_token is None or self._decode_step_seconds is None:
            return self.prefill_chunk_tokens  # nothing measured yet
        seconds = max(CHUNK_STALL * self._decode_step_seconds, PROMPT_STALL_SECONDS)
        tokens = int(seconds / self._prefill_seconds_per_token)
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
        self._prompt_seconds = _PROMPT_DECAY * self._prompt_seconds + prompt_seconds
        self._prompt_tokens = _PROMPT_DECAY * self._prompt_tokens + prompt_tokens
        self._prefill_seconds_per_token = self._prompt_seconds / self._prompt_tokens

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


def common_blocks(a: Seq[bytes], b: Seq[bytes]) -> int:
    """How many leading blocks two prompts' chains share (chained hashes: the first difference
    ends it)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - _SMOOTHING) * previous + _SMOOTHING * value

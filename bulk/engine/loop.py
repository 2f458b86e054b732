"""The step loop: schedule, run the model, post-process. It runs on the model thread.

    step()
      intake      tokenize the requests that arrived since the last step, queue them by priority
      cancel      retire the cancelled ones (a client gone): their KV range is free for this step
      schedule    admit what fits; pick one prefill chunk and the decode rows (`Scheduler`)
      prefill     one chunk of one prompt; when the prompt is done, sample its first token
      decode      one batched forward for every request past its prompt, one token each
      retire      answer the finished ones: blocks stored, lease released, KV range freed

A request's prompt blocks are offered to the prefix cache right after its first token is streamed
(off its TTFT), and every block it computed when it retires, so the next turn of a conversation
reuses the answer too. An error in a step fails the requests that step touched, not the loop."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from bulk.engine.model_runner import ModelRunner
from bulk.engine.scheduler import Scheduler
from bulk.engine.sequence import Sequence, Status
from bulk.engine.stats import EngineStats

log = logging.getLogger(__name__)

# Called with each sampled row's logits (vocab,) and its request; tests and tools hook in here.
LogitsObserver = Callable[[Sequence, torch.Tensor], None]
OnRetire = Callable[[Sequence, "BaseException | None"], None]


class EngineLoop:
    def __init__(
        self,
        runner: ModelRunner,
        inbox: deque[Sequence],
        stats: EngineStats,
        on_retire: OnRetire,
        logits_observer: LogitsObserver | None = None,
    ) -> None:
        config = runner.config
        self.runner = runner
        self.scheduler = Scheduler(
            runner.max_batch_size,
            config.max_batch_tokens,
            config.prefill_chunk_tokens,
            always_chunk=config.batch_invariant,
        )
        self.inbox = inbox
        self.stats = stats
        self.on_retire = on_retire
        self.logits_observer = logits_observer

    @property
    def has_work(self) -> bool:
        return bool(self.inbox) or self.scheduler.has_work

    def step(self) -> None:
        self._intake()
        self._retire_cancelled()
        step = self.scheduler.schedule()
        decode = step.decode
        if step.prefill is not None and self._prefill(step.prefill, step.prefill_budget):
            decode = [*decode, step.prefill]  # its first token is out: it decodes from now on
        decode = [s for s in decode if not s.finished]
        if decode:
            self._decode(decode)
        for seq in [s for s in self.scheduler.running if s.finished]:
            self._retire(seq)

    # ---- phases -------------------------------------------------------------------------------

    def _intake(self) -> None:
        while self.inbox:
            seq = self.inbox.popleft()
            if seq.cancelled:
                self._answer(seq, None)
                continue
            try:
                self.runner.tokenize(seq)
                self.scheduler.add(seq)
            except Exception as exc:
                self._answer(seq, exc)

    def _retire_cancelled(self) -> None:
        waiting, running = self.scheduler.take_cancelled()
        for seq in waiting:
            seq.finish_reason = "cancelled"
            self._answer(seq, None)
        for seq in running:
            seq.finish_reason = "cancelled"
            self._retire(seq)

    def _prefill(self, seq: Sequence, budget: int | None) -> bool:
        """One chunk of `seq`'s prompt; True when the prompt is done and its first token sampled."""
        try:
            logits = self.runner.prefill(seq, budget)
            if logits is None:
                return False
            self._emit(seq, self.runner.sample([seq], logits.unsqueeze(0))[0], logits)
            self.stats.record_generated(1, time.monotonic())
            # Off TTFT: the first token is already on its way to the client.
            self.runner.store(seq)
        except Exception as exc:
            log.exception("prefill failed for %s", seq.request.request_id)
            self._retire(seq, exc)
            return False
        return True

    def _decode(self, seqs: list[Sequence]) -> None:
        try:
            logits = self.runner.decode(seqs)
            tokens = self.runner.sample(seqs, logits)
        except Exception as exc:
            log.exception("decode step failed for %d requests", len(seqs))
            for seq in seqs:
                self._retire(seq, exc)
            return
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            self._emit(seq, token, logits[i])
        self.stats.record_decode_step(len(seqs))
        self.stats.record_generated(len(seqs), time.monotonic())

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        if self.logits_observer is not None:
            self.logits_observer(seq, logits)
        previous = seq.last_token_at
        text = seq.append(token)
        if previous is not None and seq.last_token_at is not None:
            self.stats.record_token_interval(seq.last_token_at - previous)
        if text and seq.on_token is not None:
            try:
                seq.on_token(text)
            except Exception:
                log.exception("token callback failed for %s", seq.request.request_id)
                seq.cancel()

    def _retire(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Store its blocks, release its lease, free its KV range, answer it."""
        try:
            if error is None and seq.status is not Status.WAITING:
                self.runner.store(seq)
        except Exception:
            log.exception("storing the blocks of %s failed", seq.request.request_id)
        finally:
            self.runner.release(seq)
            if seq in self.scheduler.running:
                self.scheduler.finish(seq)
            self._answer(seq, error)

    def _answer(self, seq: Sequence, error: BaseException | None) -> None:
        seq.status = Status.FINISHED
        if seq.finish_reason is None and error is None:
            seq.finish_reason = "cancelled"
        self.on_retire(seq, error)

    # ---- shutdown -----------------------------------------------------------------------------

    def drain_waiting(self) -> list[Sequence]:
        """Every request not yet admitted, removed (shutdown fails them)."""
        pending = list(self.inbox)
        self.inbox.clear()
        return pending + self.scheduler.drain_waiting()

    def snapshot(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting) + len(self.inbox),
            "kv_tokens_in_use": scheduler.kv_tokens_in_use,
            "kv_bytes_in_use": scheduler.kv_tokens_in_use * self.runner.pool.bytes_per_token,
            "max_batch_tokens": scheduler.slots.capacity,
            "max_batch_size": scheduler.max_batch_size,
        }

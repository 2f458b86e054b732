"""The step loop: schedule, run the model, post-process. It runs on the model thread.

    step()
      intake      tokenize the requests that arrived since the last step, queue them by priority
                  (a constrained one once its grammar, compiled on the grammar thread, is ready)
      cancel      retire the cancelled ones (a client gone): their KV range is free for this step
      schedule    admit what fits; pick the prompt chunks and the decode rows (`Scheduler`)
      forward     one forward for all of them (`ModelRunner`): a token for every request past its
                  prompt, the first token of every request whose prompt it finished
      post        sample and stream each token; store the prompt blocks of finished prompts
      retire      answer the finished ones: blocks stored, lease released, KV range freed

A request's prompt blocks are offered to the prefix cache as each chunk of its prompt completes
(the last chunk's right after its first token is streamed, off its TTFT), so that a request sharing
them can start as soon as they exist, and every block it computed when it retires, so the next
turn of a conversation reuses the answer too. An error in a step fails the requests that step
touched, not the loop."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import torch

from bulk.engine.model_runner import Chunk, ModelRunner
from bulk.engine.scheduler import Scheduler
from bulk.engine.sequence import Sequence, Status
from bulk.engine.stats import EngineStats
from bulk.generation.structured import compile_async, ready_grammar

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
            prefix=runner.prefix,
        )
        self.inbox = inbox
        # Constrained requests whose grammar is being compiled (`structured.compile_async`).
        self.compiling: list[Sequence] = []
        self.stats = stats
        self.on_retire = on_retire
        self.logits_observer = logits_observer

    @property
    def has_work(self) -> bool:
        return bool(self.inbox) or bool(self.compiling) or self.scheduler.has_work

    def step(self) -> None:
        self._intake()
        self._retire_cancelled()
        step = self.scheduler.schedule()
        if step.separate:  # batch invariance: the prompt chunk and the decode rows apart
            self._forward(step.prefill, [], None)
            pad_rows = self.runner.pad_rows
            self._forward([], step.decode, pad_rows(len(step.decode)) if pad_rows and step.decode else None)
        else:
            self._forward(step.prefill, step.decode, None)
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
                constraint = seq.params.constraint
                if constraint is not None:
                    # A grammar compiled before is copied here; a new one is compiled off this thread.
                    seq.grammar = ready_grammar(constraint, self.runner.lm.tokenizer)
                    if seq.grammar is None:
                        seq.compiling = compile_async(constraint, self.runner.lm.tokenizer)
                        self.compiling.append(seq)
                        continue
                self.scheduler.add(seq)
            except Exception as exc:
                self._answer(seq, exc)
        if self.compiling:
            self._take_compiled()

    def _take_compiled(self) -> None:
        """Queue the constrained requests whose grammar is ready; answer those it failed for. With
        nothing else to do, wait a little for them (all of them: requests that came together start
        together) instead of spinning the model thread."""
        if not self.scheduler.has_work:
            wait([s.compiling for s in self.compiling if s.compiling], timeout=0.05)
        still: list[Sequence] = []
        for seq in self.compiling:
            assert seq.compiling is not None
            if seq.cancelled:
                seq.compiling.cancel()
                self._answer(seq, None)
            elif not seq.compiling.done():
                still.append(seq)
            elif (error := seq.compiling.exception()) is not None:
                self._answer(seq, error)
            else:
                seq.grammar = seq.compiling.result()
                self.scheduler.add(seq)
        self.compiling = still

    def _retire_cancelled(self) -> None:
        waiting, running = self.scheduler.take_cancelled()
        for seq in waiting:
            seq.finish_reason = "cancelled"
            self._answer(seq, None)
        for seq in running:
            seq.finish_reason = "cancelled"
            self._retire(seq)

    def _forward(self, chunks: list[Chunk], decode: list[Sequence], pad_to: int | None) -> None:
        """One forward, its tokens sampled and streamed; then the full prompt blocks its chunks
        completed are stored (off the TTFT of those whose prompt it finished: their first token is
        already out), where requests waiting to share them will find them."""
        if not chunks and not decode:
            return
        try:
            started = time.perf_counter()
            rows = self.runner.forward(chunks, decode, pad_to)
            # What the forward computed: a chunk the prefix lookup found cached costs nothing.
            prompt_tokens = self.runner.prompt_tokens_computed
            self.scheduler.observe_step(prompt_tokens, len(decode), time.perf_counter() - started)
            tokens = self.runner.sample(rows)
        except Exception as exc:
            log.exception("a forward failed for %d requests", len(chunks) + len(decode))
            for seq in [s for s, _ in chunks] + list(decode):
                self._retire(seq, exc)
            return
        for (seq, logits), token in zip(rows, tokens, strict=True):
            self._emit(seq, token, logits)
        if decode:
            self.stats.record_decode_step(len(decode))
        self.stats.record_generated(len(rows), time.monotonic())
        for seq, _ in chunks:
            try:
                self.runner.store(seq)
            except Exception:
                log.exception("storing the prompt blocks of %s failed", seq.request.request_id)

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
        pending = list(self.inbox) + self.compiling
        self.inbox.clear()
        self.compiling = []
        return pending + self.scheduler.drain_waiting()

    def snapshot(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting) + len(self.inbox) + len(self.compiling),
            "kv_tokens_in_use": scheduler.kv_tokens_in_use,
            "kv_bytes_in_use": scheduler.kv_tokens_in_use * self.runner.pool.bytes_per_token,
            "max_batch_tokens": scheduler.slots.capacity,
            "max_batch_size": scheduler.max_batch_size,
        }

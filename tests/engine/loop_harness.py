"""The engine's real step loop, stepped by the test itself.

Requests join at the steps the test chooses and nothing runs on another thread, so every
interleaving (who is admitted when, which chunk runs beside which decode batch) is exactly
reproducible. Everything below the loop is the engine's own: scheduler, model runner, KV pool,
prefix cache, sampling."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any, NamedTuple

import torch

from bulk.config import KVCacheConfig
from bulk.engine.loop import EngineLoop
from bulk.engine.model_runner import ModelRunner
from bulk.engine.request import parse_request
from bulk.engine.sequence import Sequence
from bulk.engine.stats import EngineStats
from bulk.models.loader import LoadedModel
from bulk.storage.prefix_cache import PrefixCache


class LoopHarness:
    def __init__(self, lm: LoadedModel, config: KVCacheConfig) -> None:
        self.lm, self.config = lm, config
        self.prefix = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(config.block_size))
        self.runner = ModelRunner(lm, self.prefix, config)
        self.stats = EngineStats()
        self.loop = EngineLoop(self.runner, deque(), self.stats, self._retired, self._observe)
        self.steps = 0
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, BaseException] = {}
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)  # per request, per token
        # (step, kind, request id): "token" for each streamed piece of text, "prefill" per chunk
        self.events: list[tuple[int, str, str]] = []
        self.chunks: list[tuple[int, str, int]] = []  # (step, request id, prompt tokens computed)
        self.batch_sizes: list[int] = []  # decode rows of each step that decoded
        self.kv_in_use: list[int] = []  # KV tokens reserved by running requests, after each step
        self._wrap_runner()

    def _wrap_runner(self) -> None:
        forward = self.runner.forward

        def recorded_forward(chunks: Any, decode: Any, pad_to: Any = None) -> Any:
            for seq, take in chunks:
                rid = seq.request.request_id
                self.events.append((self.steps, "prefill", rid))
                self.chunks.append((self.steps, rid, take))
            if decode:
                self.batch_sizes.append(len(decode))
            return forward(chunks, decode, pad_to)

        self.runner.forward = recorded_forward  # type: ignore[method-assign]

    def submit(self, prompt: str, **params: Any) -> Sequence:
        request = parse_request({"query": prompt, "response_cache": False, **params}, self.config)
        rid = request.request_id
        seq = Sequence(request, time.perf_counter(), lambda _: self.events.append((self.steps, "token", rid)))
        self.loop.inbox.append(seq)
        return seq

    def step(self) -> None:
        self.loop.step()
        self.kv_in_use.append(self.loop.scheduler.kv_tokens_in_use)
        self.steps += 1

    def run(self, arrivals: dict[int, list[tuple[str, dict[str, Any]]]] | None = None) -> list[Sequence]:
        """Step until idle, submitting `arrivals[step]` (prompt, params) before that step; returns the
        submitted sequences in submission order."""
        arrivals = dict(arrivals or {})
        submitted: list[Sequence] = []
        while self.loop.has_work or arrivals:
            for prompt, params in arrivals.pop(self.steps, []):
                submitted.append(self.submit(prompt, **params))
            self.step()
        return submitted

    def _observe(self, seq: Sequence, logits: torch.Tensor) -> None:
        self.logits[seq.request.request_id].append(logits.detach().clone())

    def _retired(self, seq: Sequence, error: BaseException | None) -> None:
        if error is not None:
            self.errors[seq.request.request_id] = error
        else:
            self.results[seq.request.request_id] = seq.result(self.lm.name)


class Solo(NamedTuple):
    result: dict[str, Any]
    logits: list[torch.Tensor]  # of each token, (vocab,)
    token_ids: list[int]


def solo(lm: LoadedModel, config: KVCacheConfig, prompt: str, **params: Any) -> Solo:
    """`prompt` run alone in a fresh loop."""
    harness = LoopHarness(lm, config)
    (seq,) = harness.run({0: [(prompt, params)]})
    rid = seq.request.request_id
    return Solo(harness.results[rid], harness.logits[rid], seq.output_ids)

"""One request's state on the model thread, from the queue to its answer: a `Sequence`.

The engine creates it (caller's thread), the step loop fills it in: the prompt's token ids at
intake, its KV range and cached prefix at admission and prefill, one token per decode step, and its
result when it retires. Everything but `cancel()` and the future is touched by the model thread
only."""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from bulk.engine.request import GenerationRequest
from bulk.engine.result import LOGPROBS_FIELD, GenerationResult, TokenLogprob, TokenLogprobs
from bulk.generation.sampling import make_generator
from bulk.generation.structured import RowGrammar
from bulk.models.tokenizer import TextStream, Tokenizer

if TYPE_CHECKING:
    from bulk.storage.prefix_cache import PrefixHit

log = logging.getLogger(__name__)

OnToken = Callable[[str], None]  # called on the model thread with each piece of text, in order

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued: no KV range yet
    PREFILL = "prefill"  # admitted: its prompt is being computed, a chunk per step
    DECODE = "decode"  # one token per step
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        started: float,
        on_token: OnToken | None = None,
        record: bool = True,
    ) -> None:
        self.request = request
        self.record = record  # counted in the stats and seen by listeners (not a warmup)
        self.params = request.params
        self.started = started  # time.perf_counter() when the engine accepted the request
        self.on_token = on_token
        self.future: Future[GenerationResult] = Future()
        self.arrival = next(_arrivals)  # FIFO within a priority
        self.status = Status.WAITING
        self._cancelled = False
        # Filled in at intake (`ModelRunner.tokenize`).
        self.prompt_ids: list[int] = []
        self.max_new_tokens = 0
        self.capacity = 0  # KV tokens reserved: prompt + max_new_tokens
        self.eos_ids: frozenset[int] = frozenset()
        # The request's `stop_token_ids`: they end the answer like the end of sequence, even with
        # `ignore_eos` (as vLLM). `end_ids`: every token kept out before `min_tokens` (at intake).
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.end_ids: frozenset[int] = self.stop_ids
        self.stream: TextStream | None = None
        # A constrained request's grammar (`bulk.generation.structured`): compiled off the model
        # thread after intake (`compiling`), then the matcher every token of the answer advances.
        self.compiling: Future[RowGrammar] | None = None
        self.grammar: RowGrammar | None = None
        # Jump-forward (`KVCacheConfig.jump_forward`, set at intake): after each chosen token, the
        # tokens the grammar forces are taken too, without asking the model.
        self.jump_forward = False
        self._tokenizer: Tokenizer | None = None
        # Its prompt's full blocks' chained hashes (`bulk.kv.hashing`; empty for a model without
        # prefix reuse): what the scheduler compares with the prefills under way.
        self.block_hashes: tuple[bytes, ...] = ()
        # Filled in at admission and prefill.
        self.slot: int | None = None  # start of its range in the KV pool
        self.hit: PrefixHit | None = None  # the cached prefix, pinned until retirement
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.num_computed = 0  # tokens whose KV its range holds
        self.cache: Any = None  # transformers' cache over its range (prefill; solo decode)
        # Generation.
        self.generator = make_generator(self.params)
        self.output_ids: list[int] = []
        self.text = ""
        self.next_token: int | None = None  # sampled, not yet fed to the model
        # The answer's tokens not yet fed to the model: the one sampled, and any the grammar forced
        # after it (jump-forward). The next step computes them all in the request's row.
        self.uncomputed: list[int] = []
        # Requests asking for logprobs: one entry per answer token; the sampler leaves the chosen
        # token's numbers in `sampled_logprobs` for `append` to take. None (and never computed) else.
        self.logprobs: list[TokenLogprobs] | None = [] if self.params.logprobs is not None else None
        self.sampled_logprobs: tuple[float, list[tuple[int, float]]] | None = None
        # Where in the text a stop string may start being found: text out before `min_tokens` was
        # reached is not searched again (vLLM looks only at new text, and skips the look before).
        self._stop_from = 0
        self.finish_reason: str | None = None
        self.ttft_ms: float | None = None
        self.last_token_at: float | None = None

    # ---- any thread --------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (a client gone): the loop retires it at its next step."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or self.future.cancelled()

    # ---- the model thread --------------------------------------------------------------------

    def start(self, prompt_ids: list[int], max_new_tokens: int, tokenizer: Tokenizer) -> None:
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.capacity = len(prompt_ids) + max_new_tokens
        self.eos_ids = tokenizer.eos_token_ids
        self.end_ids = self.eos_ids | self.stop_ids
        self.stream = TextStream(tokenizer)
        self._tokenizer = tokenizer

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def prefill_started(self) -> bool:
        """Its prefix lookup is done (it holds its cached prefix, copied into its KV range)."""
        return self.hit is not None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to compute."""
        return len(self.prompt_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def min_tokens_pending(self) -> bool:
        """Fewer than `min_tokens` tokens are out: the next one may not be an end of sequence."""
        return len(self.output_ids) < self.params.min_tokens

    @property
    def token_ids(self) -> list[int]:
        """Prompt and answer so far."""
        return self.prompt_ids + self.output_ids

    def append(self, token: int) -> str:
        """Take the token sampled for this sequence, and with jump-forward the tokens its grammar
        then forces; return the text they complete ("" while a character is incomplete, or when
        the token ends the answer). Sets `finish_reason` on EOS (unless `ignore_eos`: then it is an
        ordinary token), on a stop string (the text ends before it, as OpenAI's API does; looked for
        only once `min_tokens` tokens are out), when a constrained answer's grammar is complete, and
        at `max_new_tokens`. The sampler keeps EOS out before `min_tokens` (`ModelRunner.sample`)."""
        now = time.perf_counter()
        if self.ttft_ms is None:
            self.ttft_ms = (now - self.started) * 1000
        self.last_token_at = now
        delta = self._take(token)
        self.uncomputed = [token]
        if self.jump_forward and self.grammar is not None and not self.finished:
            for forced in self.grammar.forced():
                delta += self._take(forced)
                if self.finished:
                    break
                self.uncomputed.append(forced)
        return delta

    def _take(self, token: int) -> str:
        """`append` for one token."""
        assert self.stream is not None
        params = self.params
        if self.grammar is not None and not self.grammar.advance(token):
            # The sampler only chooses among the tokens the grammar allows; this is a bug, not the
            # request's fault: end the answer rather than go on unconstrained.
            log.error(
                "%s: the grammar refused token %d: %s", self.request.request_id, token, self.grammar.error
            )
            self.finish_reason = "stop"
            return ""
        if token in self.stop_ids or (token in self.eos_ids and not params.ignore_eos):
            self.finish_reason = "stop"
            return ""
        self.output_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(self._logprob_entry(token))
        emitted = len(self.text)
        self.stream.push(token)
        cut = None
        if len(self.output_ids) < params.min_tokens:
            self._stop_from = len(self.stream.text)
        elif params.stop:
            cut = _stop_index(self.stream.text, params.stop, self._stop_from)
        if cut is not None:
            self.text = self.stream.text[:cut]
            self.finish_reason = "stop"
            return self.text[emitted:]
        if self.grammar is not None and self.grammar.complete:
            self.finish_reason = "stop"
            self.stream.finish()
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
            self.stream.finish()  # a character left incomplete at the very end
        # The text out so far: a character still incomplete is held back by the stream.
        self.text = self.stream.text
        self.next_token = token
        return self.text[emitted:]

    def _logprob_entry(self, token: int) -> TokenLogprobs:
        """The sampler's numbers for `token` (`ModelRunner.sample`), with the tokens' texts."""
        # Every token of a request asking for logprobs is chosen by `ModelRunner.sample`, which sets them.
        assert self.sampled_logprobs is not None, "a token without the sampler's logprobs"
        chosen, alternatives = self.sampled_logprobs
        self.sampled_logprobs = None
        top = [self._token_logprob(i, value) for i, value in alternatives]
        return {**self._token_logprob(token, chosen), "top_logprobs": top}

    def _token_logprob(self, token: int, logprob: float) -> TokenLogprob:
        assert self._tokenizer is not None
        text = self._tokenizer.decode([token])
        return {"token_id": token, "token": text, "bytes": list(text.encode()), "logprob": logprob}

    def result(self, model_name: str) -> GenerationResult:
        result = self._result(model_name)
        if self.logprobs is not None:
            cast(dict[str, Any], result)[LOGPROBS_FIELD] = self.logprobs
        return result

    def _result(self, model_name: str) -> GenerationResult:
        now = time.perf_counter()
        return {
            "result": self.text,
            "cache_hit": self.cached_tokens > 0,
            "response_cached": False,
            "latency": (now - self.started) * 1000,
            "ttft_ms": self.ttft_ms if self.ttft_ms is not None else (now - self.started) * 1000,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "finish_reason": self.finish_reason,
            "request_id": self.request.request_id,
            "model": model_name,
        }


def _stop_index(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the first stop string in `text` begins, among those with a character at or after `start`."""
    hits = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else None

"""The model runner: the model work of a step, as the scheduler asked for it.

    tokenize       a request's prompt ids and its KV reservation (at intake)
    prefill        one chunk of one request's prompt, starting with its prefix lookup
    decode         one token for every decoding request, in one batched forward
    sample         each row with its own parameters and generator
    store / free   a request's full blocks offered to the prefix cache, its lease released

Each running request computes into its own range of the KV pool (`bulk.models.kv_pool`); the
prefix cache's blocks are copied into that range once, when its prefill starts. Everything that
knows transformers sits behind `bulk.models`."""

from __future__ import annotations

import logging

import torch

from bulk.config import KVCacheConfig
from bulk.engine.sequence import Sequence, Status
from bulk.errors import InvalidRequestError, PromptTooLongError
from bulk.generation.decode import decode_one, prefill
from bulk.generation.sampling import sample
from bulk.kv.prefix_cache import PrefixCache
from bulk.models import batched_attention, hf_cache
from bulk.models.kv_pool import KVPool, blocks_out, copy_blocks_in
from bulk.models.loader import LoadedModel

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, lm: LoadedModel, prefix: PrefixCache, config: KVCacheConfig) -> None:
        self.lm = lm
        self.prefix = prefix
        self.config = config
        self.pool = KVPool(
            lm.num_layers,
            lm.num_kv_heads,
            lm.head_dim,
            config.max_batch_tokens,
            lm.dtype,
            lm.device,
        )
        # Requests compute in the pool only when the model's cache is plain attention throughout;
        # other models (sliding window, recurrent) keep transformers' own cache, one request at a
        # time.
        self.uses_pool = lm.supports_block_reuse
        why_not = batched_attention.enable(lm.model)
        self.batched = why_not is None
        if why_not is not None:
            log.warning("model %s decodes one request at a time: %s", lm.name, why_not)
        self.pad_rows = None
        if config.batch_invariant and self.batched:
            self.pad_rows = batched_attention.invariant_rows(lm.model, config.max_batch_size)
            if self.pad_rows is None:
                log.warning(
                    "batch_invariant: no padding makes this machine's GEMMs batch-invariant for %s; "
                    "decoding one request at a time instead",
                    lm.name,
                )
        # The model decodes one request per step when it cannot batch, or when batch invariance
        # can only be had that way.
        self.max_batch_size = config.max_batch_size if self.batched else 1
        if config.batch_invariant and self.pad_rows is None:
            self.max_batch_size = 1

    # ---- intake -------------------------------------------------------------------------------

    def tokenize(self, seq: Sequence) -> None:
        lm = self.lm
        ids = lm.tokenizer.encode(seq.request.prompt_text(lm.tokenizer))
        if len(ids) >= lm.context_length:
            raise PromptTooLongError(
                "query", f"the prompt is {len(ids)} tokens; the model's context holds {lm.context_length}"
            )
        max_new = min(seq.params.max_new_tokens, lm.context_length - len(ids))
        if len(ids) + max_new > self.config.max_batch_tokens:
            raise InvalidRequestError(
                "max_new_tokens",
                f"the prompt ({len(ids)} tokens) and max_new_tokens ({max_new}) need more KV than "
                f"max_batch_tokens ({self.config.max_batch_tokens}) holds",
            )
        seq.start(ids, max_new, lm.tokenizer)

    # ---- prefill ------------------------------------------------------------------------------

    def begin_prefill(self, seq: Sequence) -> None:
        """Take the longest cached prefix (pinned until the request retires) and copy it into the
        request's range. At most len - 1 prompt tokens are reused: the last one is computed for its
        logits, so a fully cached prompt costs a one-token forward."""
        lm, ids = self.lm, seq.prompt_ids
        seq.hit = self.prefix.lookup(ids if lm.supports_block_reuse else [], max_tokens=len(ids))
        reused = min(seq.hit.num_tokens, len(ids) - 1)
        seq.cached_tokens = seq.num_computed = reused
        if self.uses_pool:
            assert seq.slot is not None
            slot = self.pool.slot(seq.slot, seq.capacity)
            copy_blocks_in(slot, seq.hit.blocks, reused)
            seq.cache = hf_cache.cache_on_buffer(lm.model, slot, reused)
        else:
            seq.cache = hf_cache.new_cache(lm.model)
        seq.hit.blocks = []  # copied: the pool holds them now

    def prefill(self, seq: Sequence, budget: int | None) -> torch.Tensor | None:
        """Compute the next chunk of the prompt (all of what is left when `budget` is None); the
        last position's logits (vocab,) once the prompt is done, else None."""
        if seq.hit is None:
            self.begin_prefill(seq)
        take = seq.prompt_left if budget is None else min(budget, seq.prompt_left)
        logits, seq.cache = prefill(self.lm, seq.prompt_ids[: seq.num_computed + take], seq.cache)
        seq.num_computed += take
        if seq.prompt_left:
            return None
        seq.status = Status.DECODE
        return logits

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each request its last sampled token; their next logits (len(seqs), vocab)."""
        tokens = [s.next_token for s in seqs]
        assert all(t is not None for t in tokens)
        if not self.batched:
            (seq,) = seqs
            logits, seq.cache = decode_one(self.lm, seq.next_token, seq.cache)  # type: ignore[arg-type]
            seq.num_computed += 1
            return logits.unsqueeze(0)
        starts = [s.slot for s in seqs]
        assert all(start is not None for start in starts)
        batch = batched_attention.decode_batch(self.pool.buffer, starts, [s.num_computed for s in seqs])  # type: ignore[arg-type]
        rows = self.pad_rows(len(seqs)) if self.pad_rows is not None else None
        logits = batched_attention.decode_step(self.lm.model, tokens, batch, rows)  # type: ignore[arg-type]
        for seq in seqs:
            seq.num_computed += 1
        return logits

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits` (rows, vocab), each with its request's parameters and
        generator: a seeded request samples the same tokens whatever runs beside it."""
        greedy = logits.argmax(dim=-1).tolist() if any(s.params.temperature == 0.0 for s in seqs) else []
        return [
            greedy[i] if seq.params.temperature == 0.0 else sample(logits[i], seq.params, seq.generator)
            for i, seq in enumerate(seqs)
        ]

    # ---- retirement ---------------------------------------------------------------------------

    def store(self, seq: Sequence) -> int:
        """Offer the full blocks of every token whose KV is computed (prompt, and the answer fed back
        so far) to the prefix cache; returns how many were new."""
        if not (self.lm.supports_block_reuse and self.uses_pool and seq.hit is not None):
            return 0
        assert seq.slot is not None
        slot = self.pool.slot(seq.slot, seq.capacity)
        ids = seq.token_ids[: seq.num_computed]
        bs = self.prefix.block_size
        return self.prefix.store_blocks(seq.hit, ids, lambda start, stop: blocks_out(slot, start, stop, bs))

    def release(self, seq: Sequence) -> None:
        if seq.hit is not None and not seq.hit.lease.released:
            self.prefix.release(seq.hit)
        seq.cache = None

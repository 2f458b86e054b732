"""The model runner: the model work of a step, as the scheduler asked for it.

    tokenize       a request's prompt ids and its KV reservation (at intake)
    forward        one forward for the step: a chunk of prompt for each request being prefilled
                   (starting with its prefix lookup) and one token for each decoding request
    sample         each row with its own parameters and generator
    store / free   a request's full blocks offered to the prefix cache, its lease released

Each running request computes into its own range of the KV pool (`bulk.models.kv_pool`); the
prefix cache's blocks are copied into that range once, when its prefill starts. Everything that
knows transformers sits behind `bulk.models`. A model that cannot batch this way (see
`batched_attention.enable`) runs each request through transformers' own cache instead, one at a
time."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from bulk.config import KVCacheConfig
from bulk.engine.sequence import Sequence, Status
from bulk.errors import InvalidRequestError, PromptTooLongError
from bulk.generation.decode import decode_one, prefill
from bulk.generation.sampling import process_logits, sample, suppress_tokens, token_logprobs
from bulk.generation.structured import apply_bitmask, masks
from bulk.kv.hashing import chain_hashes
from bulk.models import batched_attention, hf_cache, llama_step, native
from bulk.models.batched_attention import Segment
from bulk.models.kv_pool import KVPool, blocks_out, copy_blocks_in
from bulk.models.loader import LoadedModel
from bulk.storage.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

Chunk = tuple[Sequence, int]  # a request being prefilled, and how many prompt tokens to compute now


class ModelRunner:
    def __init__(self, lm: LoadedModel, prefix: PrefixCache, config: KVCacheConfig) -> None:
        self.lm = lm
        self.prefix = prefix
        self.config = config
        why_not = batched_attention.enable(lm.model)
        self.batched = why_not is None
        # Requests compute in the pool, and store and reuse KV blocks, when every layer is full or
        # sliding-window attention and the model batches (our attention applies the windows), or
        # when every layer is full attention (transformers' own cache over the pool, one request at
        # a time). Others (recurrent layers; a sliding window without our attention) keep
        # transformers' own cache, one request at a time, without reuse.
        self.uses_pool = lm.supports_block_reuse and (self.batched or hf_cache.plain_attention(lm.model))
        if lm.supports_block_reuse and not self.uses_pool:
            log.warning("model %s: KV prefix reuse is off (its sliding-window layers need batching)", lm.name)
        if why_not is not None:
            log.warning("model %s decodes one request at a time: %s", lm.name, why_not)
        # Decode rows go to the native decode attention where it is built (`bulk.models.native`:
        # CPU code, so not asked for on another device).
        native_code = config.native_decode and lm.device.type == "cpu"
        self.decode_attention = native.decode_attention() if self.batched and native_code else None
        # Prompt chunks of bfloat16 models go to the native prompt attention where the CPU has AMX
        # tiles or AVX512-BF16.
        self.prompt_attention = native.prompt_attention() if self.batched and native_code else None
        # Batched attention may read a pool in float32 (`batched_attention.pool_dtype`), unless the
        # native decode attention reads it as it is; transformers' own cache over the pool needs
        # the model's dtype.
        kernel = self.decode_attention is not None and native.has_decode_kernel(lm.model)
        # Greedy rows' choice: ATen's argmax walks a row an element at a time (a 16-row step's
        # logits over SmolLM2's 49,152 tokens: about 1.5 ms), the native one at vector width.
        self.argmax = (native.argmax_rows() if native_code else None) or _argmax
        # A constrained row's grammar mask: ATen's way costs about 0.2 ms a row, the native one a tenth.
        self.apply_bitmask = (native.apply_token_bitmask() if native_code else None) or apply_bitmask
        dtype = batched_attention.pool_dtype(lm.dtype, lm.device, kernel) if self.batched else lm.dtype
        self.pool = KVPool(
            lm.num_layers,
            lm.num_kv_heads,
            lm.head_dim,
            config.max_batch_tokens,
            dtype,
            lm.device,
        )
        # Llama models run the step as a plain function over their modules (`bulk.models.llama_step`),
        # bit-identical to transformers' forward and cheaper per step; others run transformers'.
        self.plain_step = None
        if self.batched:
            checked_as = f"{lm.fingerprint}/{lm.dtype_name}/{lm.device}"
            self.plain_step, why_plain = llama_step.build(lm.model, checked_as, native_code)
            if why_plain is not None:
                log.info("model %s runs transformers' forward for each step: %s", lm.name, why_plain)
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
        self.prompt_tokens_computed = 0  # by the last forward: its chunks after the prefix lookup
        if config.batch_invariant and self.pad_rows is None:
            self.max_batch_size = 1

    # ---- intake -------------------------------------------------------------------------------

    def tokenize(self, seq: Sequence) -> None:
        lm = self.lm
        ids = seq.request.prompt_ids(lm.tokenizer)
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
        vocab = lm.tokenizer.vocab_size
        for name, tokens in (
            ("logit_bias", [token for token, _ in seq.params.logit_bias]),
            ("stop_token_ids", seq.params.stop_token_ids),
        ):
            if tokens and max(tokens) >= vocab:
                raise InvalidRequestError(
                    name, f"token id {max(tokens)} is not in the model's vocabulary ({vocab} tokens)"
                )
        seq.start(ids, max_new, lm.tokenizer)
        # Jump-forward feeds a row several tokens at once: the batched step's rows (not the
        # one-by-one fallback's), without batch invariance's fixed shapes, and not for logprobs,
        # which forced tokens, never sampled, would not have.
        seq.jump_forward = (
            self.config.jump_forward
            and self.batched
            and not self.config.batch_invariant
            and seq.params.logprobs is None
        )
        if self.uses_pool:
            # The scheduler compares them with the prefills under way (`Scheduler._waits_for`).
            seq.block_hashes = tuple(chain_hashes(ids, self.prefix.block_size, self.prefix.namespace))

    # ---- prefill ------------------------------------------------------------------------------

    def begin_prefill(self, seq: Sequence) -> None:
        """Take the longest cached prefix (pinned until the request retires) and copy it into the
        request's range. At most len - 1 prompt tokens are reused: the last one is computed for its
        logits, so a fully cached prompt costs a one-token forward."""
        lm, ids = self.lm, seq.prompt_ids
        seq.hit = self.prefix.lookup(ids if self.uses_pool else [], max_tokens=len(ids))
        reused = min(seq.hit.num_tokens, len(ids) - 1)
        seq.cached_tokens = seq.num_computed = reused
        if self.uses_pool:
            assert seq.slot is not None
            slot = self.pool.slot(seq.slot, seq.capacity)
            copy_blocks_in(slot, seq.hit.blocks, reused)
            if not self.batched:  # transformers' own cache, over the same range
                seq.cache = hf_cache.cache_on_buffer(lm.model, slot, reused)
        else:
            seq.cache = hf_cache.new_cache(lm.model)
        seq.hit.blocks = []  # copied: the pool holds them now

    def forward(
        self, chunks: Seq[Chunk], decode: Seq[Sequence], pad_to: int | None = None
    ) -> list[tuple[Sequence, torch.Tensor]]:
        """One forward for the step: `chunks` of prompts and one token for each of `decode`. Returns
        (request, logits (vocab,)) for every request that now has a next token to sample: those whose
        prompt this step finished, then the decoding ones. `pad_to`: see `forward_step`."""
        for seq, _ in chunks:
            if seq.hit is None:
                self.begin_prefill(seq)
        # The scheduler counted from before the prefix lookup: what is cached needs no computing.
        chunks = [(seq, min(take, seq.prompt_left)) for seq, take in chunks]
        self.prompt_tokens_computed = sum(take for _, take in chunks)
        if not self.batched:
            return self._forward_one_by_one(chunks, decode)
        segments: list[Segment] = []
        tokens: list[int] = []
        logits_at: list[int] = []
        ready: list[Sequence] = []
        for seq, take in chunks:
            assert seq.slot is not None
            segments.append(Segment(seq.slot, seq.num_computed, take))
            tokens.extend(seq.prompt_ids[seq.num_computed : seq.num_computed + take])
            if seq.num_computed + take == len(seq.prompt_ids):
                logits_at.append(len(tokens) - 1)
                ready.append(seq)
        # Rows holding tokens a grammar forced after the sampled one (jump-forward) run as chunks:
        # their tokens side by side, the logits of the last one kept; then the one-token rows.
        forced = [seq for seq in decode if len(seq.uncomputed) > 1]
        rows = [seq for seq in decode if len(seq.uncomputed) <= 1]
        for seq in forced + rows:
            assert seq.slot is not None and seq.next_token is not None
            fed = seq.uncomputed if seq.uncomputed else [seq.next_token]
            segments.append(Segment(seq.slot, seq.num_computed, len(fed)))
            tokens.extend(fed)
            logits_at.append(len(tokens) - 1)
            ready.append(seq)
        rows_from = len(chunks) + len(forced)
        batch = batched_attention.step_batch(
            self.pool.buffer, segments, self.decode_attention, rows_from, self.prompt_attention
        )
        if self.plain_step is not None:
            logits = self.plain_step.forward(tokens, batch, logits_at, pad_to)
        else:
            logits = batched_attention.forward_step(self.lm.model, tokens, batch, logits_at, pad_to)
        self._advance(chunks, decode)
        return list(zip(ready, logits, strict=True))

    def _forward_one_by_one(
        self, chunks: Seq[Chunk], decode: Seq[Sequence]
    ) -> list[tuple[Sequence, torch.Tensor]]:
        """The fallback: transformers' own cache per request, a forward each."""
        out = []
        for seq, take in chunks:
            logits, seq.cache = prefill(self.lm, seq.prompt_ids[: seq.num_computed + take], seq.cache)
            if seq.num_computed + take == len(seq.prompt_ids):
                out.append((seq, logits))
        for seq in decode:
            assert seq.next_token is not None
            logits, seq.cache = decode_one(self.lm, seq.next_token, seq.cache)
            out.append((seq, logits))
        self._advance(chunks, decode)
        return out

    @staticmethod
    def _advance(chunks: Seq[Chunk], decode: Seq[Sequence]) -> None:
        for seq, take in chunks:
            seq.num_computed += take
            if seq.num_computed == len(seq.prompt_ids):
                seq.status = Status.DECODE
        for seq in decode:
            seq.num_computed += len(seq.uncomputed) or 1

    def sample(self, rows: Seq[tuple[Sequence, torch.Tensor]]) -> list[int]:
        """One token per (request, logits) row, each with its request's parameters and generator: a
        seeded request samples the same tokens whatever runs beside it. A row whose request asks for
        them gets its logit bias and penalties (`process_logits`), then, short of its `min_tokens`,
        its end-of-sequence and stop-token logits set to -inf, so it cannot end yet: in its row, greedy
        or sampled; the other rows are left as they are. A request asking for logprobs has them
        computed from that same row (`token_logprobs`), and only then. Both the batched forward and
        the one-by-one fallback come here."""
        if not rows:
            return []
        # The constrained rows' grammar masks, computed together (`structured.masks`).
        grammars = [seq.grammar for seq, _ in rows if seq.grammar is not None]
        row_masks = iter(masks(grammars)) if grammars else None
        for seq, logits in rows:
            if seq.params.processes_logits:
                process_logits(logits, seq.params, seq.prompt_ids, seq.output_ids)
            if seq.grammar is not None:
                assert row_masks is not None
                with torch.inference_mode():  # the model's logits are inference tensors
                    self.apply_bitmask(logits, next(row_masks))
                # A grammar that allows only the end (its answer complete) wins over `min_tokens`.
                if seq.min_tokens_pending and _only(logits, seq.end_ids):
                    continue
            if seq.min_tokens_pending:
                suppress_tokens(logits, seq.end_ids)
        greedy = self.argmax(torch.stack([logits for _, logits in rows])).tolist()
        tokens = [
            greedy[i] if seq.params.temperature == 0.0 else sample(logits, seq.params, seq.generator)
            for i, (seq, logits) in enumerate(rows)
        ]
        for (seq, logits), token in zip(rows, tokens, strict=True):
            if seq.logprobs is not None:
                seq.sampled_logprobs = token_logprobs(logits, token, seq.params.logprobs or 0)
        return tokens

    # ---- retirement ---------------------------------------------------------------------------

    def store(self, seq: Sequence) -> int:
        """Offer the full blocks of every token whose KV is computed (prompt, and the answer fed back
        so far) to the prefix cache; returns how many were new."""
        if not (self.uses_pool and seq.hit is not None):
            return 0
        assert seq.slot is not None
        slot = self.pool.slot(seq.slot, seq.capacity)
        ids = seq.token_ids[: seq.num_computed]
        bs = self.prefix.block_size
        return self.prefix.store_blocks(
            seq.hit, ids, lambda start, stop: blocks_out(slot, start, stop, bs, self.lm.dtype)
        )

    def release(self, seq: Sequence) -> None:
        if seq.hit is not None and not seq.hit.lease.released:
            self.prefix.release(seq.hit)
        seq.cache = None


def _only(logits: torch.Tensor, token_ids: frozenset[int]) -> bool:
    """Every token `logits` (vocab,) allows (a finite logit) is one of `token_ids`."""
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    return bool(allowed) and set(allowed) <= token_ids


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)

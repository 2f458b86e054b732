"""One request on the model thread, as a plain function: take the longest cached prefix, prefill the
rest, decode, store the new full blocks. The engine around it owns queueing, caching and stats."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from bulk.engine.request import GenerationRequest
from bulk.errors import PromptTooLongError
from bulk.generation.decode import Completion, Step, decode, prefill
from bulk.kv.prefix_cache import PrefixCache, PrefixHit
from bulk.models import hf_cache
from bulk.models.loader import LoadedModel

OnStep = Callable[[Step], None]


def generate(
    lm: LoadedModel,
    prefix: PrefixCache,
    arena: hf_cache.KVArena,
    request: GenerationRequest,
    started: float,
    on_step: OnStep | None = None,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """Run `request`: reuse the longest cached prefix, prefill the rest, decode (calling `on_step`
    for each token, stopping early once `cancelled` is set), store the new full blocks. `started` is
    when the caller accepted the request (`time.perf_counter()`), for latency and TTFT."""
    ids = lm.tokenizer.encode(request.prompt)
    if len(ids) >= lm.context_length:
        raise PromptTooLongError(
            "query", f"the prompt is {len(ids)} tokens; the model's context holds {lm.context_length}"
        )
    # Look up the whole prompt, but reuse at most len - 1 tokens: the last prompt token must be
    # computed for its logits. A fully cached prompt thus costs a one-token forward.
    hit = prefix.lookup(ids if lm.supports_block_reuse else [], max_tokens=len(ids))
    reused = min(hit.num_tokens, len(ids) - 1)
    max_new = min(request.params.max_new_tokens, lm.context_length - len(ids))
    try:
        cache = hf_cache.cache_from_blocks(
            lm.model, hit.blocks, reused, capacity=len(ids) + max_new, arena=arena
        )
        logits, cache = prefill(lm, ids, cache)
        completion = Completion(token_ids=[], text="", finish_reason="length")
        ttft_ms = None
        for step in decode(lm, logits, cache, request.params, max_new, completion):
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - started) * 1000
                _store_blocks(lm, prefix, hit, ids, cache)  # after the first token: off TTFT
            if on_step is not None:
                on_step(step)
            if cancelled is not None and cancelled.is_set():
                completion.finish_reason = "cancelled"
                break
        if ttft_ms is None:
            ttft_ms = (time.perf_counter() - started) * 1000
        # The prompt and the completion fed back so far: a follow-up turn can reuse them too.
        all_ids = ids + completion.token_ids
        _store_blocks(lm, prefix, hit, all_ids[: hf_cache.cache_length(completion.cache)], completion.cache)
    finally:
        prefix.release(hit)
    return {
        "result": completion.text,
        "cache_hit": reused > 0,
        "response_cached": False,
        "latency": (time.perf_counter() - started) * 1000,
        "ttft_ms": ttft_ms,
        "cached_tokens": reused,
        "prompt_tokens": len(ids),
        "completion_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "request_id": request.request_id,
        "model": lm.name,
    }


def _store_blocks(lm: LoadedModel, prefix: PrefixCache, hit: PrefixHit, ids: list[int], cache: Any) -> None:
    if lm.supports_block_reuse:
        prefix.store_blocks(hit, ids, lambda s, e: hf_cache.blocks_from_cache(cache, s, e, prefix.block_size))

"""Prefill and decode as plain functions over a model and a cache, in the manner of gpt-fast.

The engine's model runner decides which cached KV to reuse and which requests share a step; these
functions only run the model on what is left for one request. (Batched decode over many requests
is `bulk.models.batched_attention.decode_step`.)"""

from __future__ import annotations

from typing import Any

import torch

from bulk.models import hf_cache
from bulk.models.loader import LoadedModel


def prefill(lm: LoadedModel, token_ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
    """Compute the KV of the tokens of `token_ids` that `cache` does not hold yet; return the last
    logits (vocab,) and the cache, now holding all of `token_ids`. At least one token must be left
    to compute. A chunked prefill passes a longer prefix of the prompt each time."""
    done = hf_cache.cache_length(cache)
    if done >= len(token_ids):
        raise ValueError(f"cache holds {done} tokens, nothing left of a {len(token_ids)}-token prompt")
    rest = torch.tensor([token_ids[done:]], dtype=torch.long, device=lm.device)
    return hf_cache.forward(lm.model, rest, cache)


def decode_one(lm: LoadedModel, token_id: int, cache: Any) -> tuple[torch.Tensor, Any]:
    """Feed one token on top of `cache`; its logits (vocab,) and the grown cache."""
    step = torch.tensor([[token_id]], dtype=torch.long, device=lm.device)
    return hf_cache.forward(lm.model, step, cache)

"""Prefill and decode as plain functions over a model and transformers' own cache, one request at a
time, in the manner of gpt-fast.

The engine's model runner uses them only for a model that cannot batch (see
`bulk.models.batched_attention.enable`): it decides which cached KV to reuse, and these functions
run the model on what is left for one request. Every other model runs a step's requests together,
prompt chunks and decoding tokens in one forward, through `bulk.models.batched_attention.forward_step`
over the KV pool."""

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

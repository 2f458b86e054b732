"""Prefill and decode as plain functions over a model and a cache, in the manner of gpt-fast.

The engine decides which cached KV to reuse; these functions only run the model on what is left."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bulk.generation.sampling import SamplingParams, make_generator, sample
from bulk.models import hf_cache
from bulk.models.loader import LoadedModel
from bulk.models.tokenizer import TextStream


def prefill(lm: LoadedModel, token_ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
    """Compute the KV of the tokens `cache` does not hold yet; return the last logits (vocab,) and the
    cache, now holding all of `token_ids`. At least one token must be left to compute."""
    done = hf_cache.cache_length(cache)
    if done >= len(token_ids):
        raise ValueError(f"cache holds {done} tokens, nothing left of a {len(token_ids)}-token prompt")
    rest = torch.tensor([token_ids[done:]], dtype=torch.long, device=lm.device)
    return hf_cache.forward(lm.model, rest, cache)


@dataclass
class Step:
    token_id: int
    text: str  # the text this token completes (may be "" while a character is incomplete)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    cache: Any = None  # the cache after the last forward: prompt plus every token fed back


def decode(
    lm: LoadedModel,
    logits: torch.Tensor,
    cache: Any,
    params: SamplingParams,
    max_new_tokens: int,
    completion: Completion,
) -> Iterator[Step]:
    """Sample up to `max_new_tokens` tokens, starting from the prefill's `logits`, yielding each as it
    comes. `completion` is filled in as the loop goes, so a caller that stops iterating early still
    has a consistent result. Stop strings end the text before the stop string, as OpenAI's API does."""
    completion.cache = cache
    generator = make_generator(params)
    stream = TextStream(lm.tokenizer)
    completion.finish_reason = "length"
    for i in range(max_new_tokens):
        token = sample(logits, params, generator)
        if token in lm.tokenizer.eos_token_ids:
            completion.finish_reason = "stop"
            break
        completion.token_ids.append(token)
        delta = stream.push(token)
        cut = _stop_index(stream.text, params.stop)
        if cut is not None:
            # Emit what precedes the stop string, and end.
            emitted = len(completion.text)
            completion.text = stream.text[:cut]
            completion.finish_reason = "stop"
            if cut > emitted:
                yield Step(token, completion.text[emitted:])
            return
        completion.text = stream.text
        yield Step(token, delta)
        if i + 1 < max_new_tokens:
            step_ids = torch.tensor([[token]], dtype=torch.long, device=lm.device)
            logits, cache = hf_cache.forward(lm.model, step_ids, cache)
            completion.cache = cache
    tail = stream.finish()
    if tail and _stop_index(stream.text, params.stop) is None:
        completion.text = stream.text


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

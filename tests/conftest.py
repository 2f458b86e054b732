"""Shared fixtures. The demo model is built once per session: engines in tests share it."""

from __future__ import annotations

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.generation.decode import Completion, decode, prefill
from bulk.generation.sampling import SamplingParams
from bulk.models.loader import LoadedModel, load_model

# Two cores, shared with subprocesses some tests start: more torch threads than one only spin.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_model() -> LoadedModel:
    return load_model(KVCacheConfig(model="demo", device="cpu"))


def generate_without_cache(lm: LoadedModel, prompt: str, max_new_tokens: int, **params) -> Completion:
    """The reference: prefill the whole prompt from nothing, decode, no cache of any kind."""
    ids = lm.tokenizer.encode(prompt)
    logits, cache = prefill(lm, ids, None)
    completion = Completion(token_ids=[], text="", finish_reason="length")
    sampling = SamplingParams(max_new_tokens=max_new_tokens, **params)
    for _ in decode(lm, logits, cache, sampling, max_new_tokens, completion):
        pass
    return completion


@pytest.fixture
def reference(demo_model):
    def run(prompt: str, max_new_tokens: int, **params) -> Completion:
        return generate_without_cache(demo_model, prompt, max_new_tokens, **params)

    return run

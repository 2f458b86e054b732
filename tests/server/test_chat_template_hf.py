"""A real Hugging Face model with its own chat template: the chat prompt is rendered by the template
(`bulk.engine.chat`, through `HFTokenizer.apply_chat_template`) and starts with exactly one BOS token
once the engine encodes it, directly and through `/v1/chat/completions` over a real socket."""

from __future__ import annotations

import pytest
import requests

from bulk.config import KVCacheConfig
from bulk.engine.chat import render_chat
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models.loader import load_model
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from tests.server.conftest import wait_ready
from tests.server.live_server import LiveServer
from tests.tiny_hf_model import save_tiny_llama

CORPUS = ["Create marketing strategy for a bakery.", "You are terse. Summarise the sales report."] * 20
# Like Llama's: the template writes the BOS text itself.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Create marketing strategy"},
]
TURNS = [(m["role"], m["content"]) for m in MESSAGES]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer adds BOS on `encode` (a post-processor, as Llama's does)."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    return save_tiny_llama(path, CORPUS, seed=5, adds_bos=True, chat_template=TEMPLATE)


def bos_count(ids: list[int], bos: int) -> int:
    count = 0
    while count < len(ids) and ids[count] == bos:
        count += 1
    return count


def test_a_rendered_chat_prompt_gets_one_bos(hf_dir):
    tokenizer = load_model(KVCacheConfig(model=str(hf_dir))).tokenizer
    bos = tokenizer._tokenizer.bos_token_id
    # Plain text still gets the BOS the tokenizer adds.
    assert bos_count(tokenizer.encode("Create marketing strategy"), bos) == 1
    prompt = render_chat(TURNS, tokenizer)
    assert prompt == tokenizer.apply_chat_template(MESSAGES)
    assert prompt.startswith("<s>[system] You are terse.\n") and prompt.endswith("[assistant] ")
    ids = tokenizer.encode(prompt)
    assert bos_count(ids, bos) == 1 and ids.count(bos) == 1
    # The engine counts exactly those tokens, for the rendered text sent raw, for the conversation,
    # and for the query, sent as a user turn after the configured system prompt.
    config = KVCacheConfig(
        model=str(hf_dir),
        default_max_new_tokens=3,
        max_new_tokens_limit=8,
        system_prompt="You are terse.",
        response_cache=False,
    )
    with UltraAdaptiveKVCacheEngine(config) as engine:
        assert engine.process_request_sync({"query": prompt, "raw": True})["prompt_tokens"] == len(ids)
        assert engine.process_request_sync({"messages": MESSAGES})["prompt_tokens"] == len(ids)
        assert engine.process_request_sync({"query": "Create marketing strategy"})["prompt_tokens"] == len(
            ids
        )


def test_apply_chat_template_without_a_template_is_a_clear_error(hf_dir):
    tokenizer = load_model(KVCacheConfig(model=str(hf_dir))).tokenizer
    tokenizer._tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template(MESSAGES)
    # ... and the server falls back to the simple documented template.
    assert render_chat(TURNS, tokenizer).startswith("<|system|>\nYou are terse.\n")


def test_chat_completions_use_the_models_template(hf_dir):
    settings = ServerSettings(
        model=str(hf_dir), device="cpu", default_max_new_tokens=3, max_new_tokens_limit=8
    )
    with LiveServer(create_app(settings)) as live:
        wait_ready(live.url)
        answer = requests.post(
            f"{live.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=60
        )
    assert answer.status_code == 200, answer.text
    tokenizer = load_model(KVCacheConfig(model=str(hf_dir))).tokenizer
    expected = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))
    assert bos_count(expected, tokenizer._tokenizer.bos_token_id) == 1
    assert answer.json()["usage"]["prompt_tokens"] == len(expected)

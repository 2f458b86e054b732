"""What the model is given (`bulk.engine.chat`): a query as a user turn after the system prompt through
the chat template, a conversation through the template, a raw prompt as it is; the demo model (no
template) gets queries unchanged; and the response cache never answers one kind with another's text."""

from __future__ import annotations

import pytest

from bulk.config import KVCacheConfig
from bulk.engine import chat
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import parse_request
from bulk.errors import InvalidRequestError


@pytest.fixture
def templated(chat_model):
    """A tiny Hugging Face Llama with a chat template of its own (tests/conftest.py)."""
    return chat_model


def _rendered(request: dict, tokenizer, **config) -> str:
    return parse_request(request, KVCacheConfig(model="demo", **config)).prompt_text(tokenizer)


def test_a_query_is_a_user_turn_after_the_system_prompt(templated):
    tokenizer = templated.tokenizer
    assert _rendered({"query": "Hi"}, tokenizer) == "<|user|>Hi\n<|assistant|>"
    assert _rendered({"query": "Hi"}, tokenizer, system_prompt="Be terse.") == (
        "<|system|>Be terse.\n<|user|>Hi\n<|assistant|>"
    )
    # raw: as it is, system prompt or not.
    assert _rendered({"query": "Hi", "raw": True}, tokenizer, system_prompt="Be terse.") == "Hi"
    # A conversation is rendered as given: the configured system prompt is not added.
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]
    assert _rendered({"messages": messages}, tokenizer, system_prompt="Be terse.") == (
        "<|system|>Own.\n<|user|>Hi\n<|assistant|>"
    )


def test_without_a_template_queries_are_unchanged(demo_model):
    tokenizer = demo_model.tokenizer
    assert _rendered({"query": "Create marketing strategy"}, tokenizer) == "Create marketing strategy"
    assert _rendered({"query": "Hi"}, tokenizer, system_prompt="Be terse.") == "Be terse.\n\nHi"
    # A conversation gets the simple documented template.
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert _rendered({"messages": messages}, tokenizer) == (
        "<|system|>\nYou are terse.\n<|user|>\nHi\n<|assistant|>\n"
    )
    with UltraAdaptiveKVCacheEngine(
        KVCacheConfig(model="demo", default_max_new_tokens=1), model=demo_model
    ) as e:
        # BOS and one token per byte: exactly the query, as before chat rendering existed.
        assert e.process_request_sync({"query": "Create marketing strategy"})["prompt_tokens"] == 26


def test_the_response_cache_keeps_raw_chat_and_conversations_apart(templated):
    config = KVCacheConfig(model="demo", default_max_new_tokens=2, system_prompt="Be terse.")
    with UltraAdaptiveKVCacheEngine(config, model=templated) as engine:
        chat_answer = engine.process_request_sync({"query": "Hi"})
        raw_answer = engine.process_request_sync({"query": "Hi", "raw": True})
        conversation = engine.process_request_sync({"messages": [{"role": "user", "content": "Hi"}]})
        again = engine.process_request_sync({"query": "Hi"})
    assert not raw_answer["response_cached"] and not conversation["response_cached"]
    assert (
        len({chat_answer["prompt_tokens"], raw_answer["prompt_tokens"], conversation["prompt_tokens"]}) == 3
    )
    assert again["response_cached"] and again["prompt_tokens"] == chat_answer["prompt_tokens"]


def test_request_prompts_of_different_kinds_never_meet():
    prompts = {
        chat.request_prompt("Hi", raw=False, messages=()),
        chat.request_prompt("Hi", raw=True, messages=()),
        chat.request_prompt("", raw=False, messages=(("user", "Hi"),)),
        chat.request_prompt("\x00raw\x00Hi", raw=False, messages=()),
        chat.request_prompt('\x00chat\x00[["user", "Hi"]]', raw=False, messages=()),
    }
    assert len(prompts) == 5
    # The hot path: a query is its own text.
    assert (
        chat.request_prompt("Create marketing strategy", raw=False, messages=())
        == "Create marketing strategy"
    )


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"query": "Hi", "raw": "yes"}, "raw"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": ["Hi"]}, "messages.0"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "Hi"}], "query": "Hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "Hi"}], "raw": True}, "raw"),
    ],
)
def test_bad_chat_fields_are_typed_errors(request_body, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(request_body, KVCacheConfig(model="demo"))
    assert info.value.field == field


def test_a_model_without_a_chat_template_is_named_at_load_with_the_fallback_format(caplog):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", response_cache=False))
    try:
        with caplog.at_level("WARNING", logger="bulk.engine.engine"):
            engine.process_request_sync({"query": "hello", "max_new_tokens": 1})
    finally:
        engine.shutdown()
    notices = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(notices) == 1
    assert "'demo'" in notices[0] and "<|role|>" in notices[0] and "<|assistant|>" in notices[0]
    # The format it names is the one conversations get.
    assert chat.render_simple([("user", "Hi")]) == "<|user|>\nHi\n<|assistant|>\n"


def test_a_model_with_a_chat_template_loads_without_the_notice(templated):
    assert chat.missing_template_notice(templated.tokenizer, "tiny") is None
    assert chat.missing_template_notice(None, "tiny") is not None

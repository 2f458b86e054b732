"""`n` choices on the OpenAI routes, through the official `openai` package over a real socket: n
answers (each its own engine request, their prompt's KV shared through the prefix cache: the prompt
computed once, the other choices reusing its blocks), seeded choices that differ and repeat,
streamed choices interleaved by index, and one usage (the prompt counted once)."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.conftest import ENDS_EARLY


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_seeded_chat_choices_differ_and_repeat(client):
    def ask():
        return client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": ENDS_EARLY}], max_tokens=6,
            temperature=1.5, seed=11, n=3, logprobs=True,
        )  # fmt: skip

    answer = ask()
    assert [c.index for c in answer.choices] == [0, 1, 2]
    texts = [c.message.content for c in answer.choices]
    assert len(set(texts)) > 1, texts  # seed, seed + 1, seed + 2
    assert [c.message.content for c in ask().choices] == texts
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices)
    for choice in answer.choices:
        if choice.message.content.isascii():  # a byte of a character alone decodes as U+FFFD
            assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_choices_share_the_prompts_computation(client, api_engine):
    prompt = f"{uuid.uuid4().hex} " * 12  # about 400 tokens, never seen before
    before = api_engine.get_stats()
    answer = client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0, n=3)
    after = api_engine.get_stats()
    texts = [c.text for c in answer.choices]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same answer thrice
    prompt_tokens = answer.usage.prompt_tokens
    assert after["prompt_tokens"] - before["prompt_tokens"] == 3 * prompt_tokens
    assert answer.usage.total_tokens == prompt_tokens + 12  # the prompt counted once
    # The first choice computed the prompt; the other two reused all its full blocks.
    block = api_engine.config.block_size
    assert after["cached_tokens"] - before["cached_tokens"] >= 2 * (prompt_tokens // block * block - block)


def test_streamed_choices_come_interleaved_by_index(client):
    whole = client.completions.create(
        model="demo", prompt=ENDS_EARLY, max_tokens=6, temperature=0, n=2, logprobs=1
    )
    stream = client.completions.create(
        model="demo", prompt=ENDS_EARLY, max_tokens=6, temperature=0, n=2, logprobs=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, tokens, reasons, usage = ["", ""], [[], []], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices] and reasons == ["length", "length"]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert usage.completion_tokens == 12 and usage.prompt_tokens == whole.usage.prompt_tokens

    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": ENDS_EARLY}], max_tokens=4, temperature=0, n=2,
        stream=True,
    )  # fmt: skip
    contents = ["", ""]
    for chunk in chat:
        for choice in chunk.choices:
            contents[choice.index] += choice.delta.content or ""
    assert contents[0] == contents[1] and len(contents[0]) > 0

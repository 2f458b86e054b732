"""Logprobs on the HTTP faces, over a real uvicorn socket: OpenAI's chat format (`logprobs`,
`top_logprobs`; `choices[0].logprobs.content`) and legacy completions format (`logprobs` as a
count; tokens, token_logprobs, top_logprobs, text_offset), parsed by the official `openai` package,
streamed and not; `/api/query` and `/ws/query` (the answer's `logprobs` list); on the demo model and
on a tiny Hugging Face model with a byte-level BPE tokenizer (`chat_model`)."""

from __future__ import annotations

import asyncio
import json
import math

import openai
import pytest
import requests
import websockets

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from tests.conftest import ENDS_EARLY
from tests.server.conftest import settings, wait_ready
from tests.server.live_server import LiveServer

CHAT = [{"role": "user", "content": ENDS_EARLY}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _check_chat(content, text: str, top: int) -> None:
    assert "".join(t.token for t in content) == text
    for token in content:
        assert token.bytes == list(token.token.encode())
        assert token.logprob <= 0.0
        values = [alternative.logprob for alternative in token.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        if top:  # greedy: the chosen token is the most likely one
            assert token.top_logprobs[0].token == token.token
            assert token.top_logprobs[0].logprob == token.logprob


def test_chat_logprobs_through_the_sdk(client):
    answer = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = answer.choices[0]
    assert len(choice.logprobs.content) == answer.usage.completion_tokens == 6
    _check_chat(choice.logprobs.content, choice.message.content, 3)
    # Without top_logprobs: the chosen tokens only; without logprobs: none, as before.
    bare = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    _check_chat(bare.choices[0].logprobs.content, choice.message.content, 0)
    assert [t.logprob for t in bare.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in choice.logprobs.content], abs=1e-4
    )
    none = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=0)
    assert none.choices[0].logprobs is None and none.choices[0].message.content == choice.message.content


def test_streamed_chat_chunks_carry_their_tokens_logprobs(client):
    whole = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    stream = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    content, text = [], ""
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None:
            content.extend(choice.logprobs.content)
    assert text == whole.choices[0].message.content
    _check_chat(content, text, 2)
    assert [t.token for t in content] == [t.token for t in whole.choices[0].logprobs.content]


def test_sampled_chat_logprobs(client):
    answer = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=6, temperature=1.2, seed=5, logprobs=True, top_logprobs=4
    )
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        # A sampled token need not be among the most likely; the list is still sorted.
        values = [a.logprob for a in token.top_logprobs]
        assert values == sorted(values, reverse=True) and token.logprob <= values[0]


def _check_legacy(logprobs, text: str, top: int) -> None:
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    for token, value, alternatives in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        # As OpenAI's: the `logprobs` most likely, and the chosen token always.
        assert alternatives[token] == value and top <= len(alternatives) <= top + 1
        assert sum(math.exp(v) for v in alternatives.values()) <= 1.0 + 1e-6


def test_completions_logprobs_in_the_legacy_format(client):
    answer = client.completions.create(
        model="demo", prompt=ENDS_EARLY, max_tokens=6, temperature=0, logprobs=2
    )
    choice = answer.choices[0]
    _check_legacy(choice.logprobs, choice.text, 2)
    assert max(choice.logprobs.top_logprobs[0].values()) == choice.logprobs.token_logprobs[0]  # greedy

    stream = client.completions.create(
        model="demo", prompt=ENDS_EARLY, max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    tokens, offsets, text = [], [], ""
    for chunk in stream:
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert text == choice.text and tokens == choice.logprobs.tokens and offsets == choice.logprobs.text_offset


def test_api_query_and_the_websocket_return_the_engines_list(server):
    body = {"query": ENDS_EARLY, "max_new_tokens": 5, "logprobs": 2}
    answer = requests.post(f"{server.url}/api/query", json=body, timeout=60).json()
    entries = answer["logprobs"]
    assert len(entries) == answer["completion_tokens"] == 5
    assert "".join(e["token"] for e in entries) == answer["result"]
    assert all(
        len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token_id"] == e["token_id"] for e in entries
    )
    plain = requests.post(f"{server.url}/api/query", json={**body, "logprobs": None}, timeout=60).json()
    assert "logprobs" not in plain and plain["result"] == answer["result"]

    async def over_the_socket():
        async with websockets.connect(f"{server.ws_url}/ws/query") as ws:
            await ws.send(json.dumps(body))
            whole = json.loads(await ws.recv())
            await ws.send(json.dumps({**body, "stream": True}))
            events = []
            while not (event := json.loads(await ws.recv())).get("done"):
                events.append(event)
            return whole, events, event

    whole, events, last = asyncio.run(over_the_socket())
    assert [e["token_id"] for e in whole["logprobs"]] == [e["token_id"] for e in entries]
    streamed = [entry for event in events for entry in event["logprobs"]]
    assert [e["token_id"] for e in streamed] == [e["token_id"] for e in last["logprobs"]]


@pytest.fixture(scope="module")
def hf_server(chat_model):
    config = KVCacheConfig(
        model=str(chat_model.name), device="cpu", dtype="float32", default_max_new_tokens=8
    )
    engine = UltraAdaptiveKVCacheEngine(config, model=chat_model)
    with LiveServer(create_app(settings(model=config.model), engine=engine)) as live:
        wait_ready(live.url)
        yield live
    engine.shutdown()


def test_a_hugging_face_tokenizers_tokens_spell_the_answer(hf_server):
    client = openai.OpenAI(base_url=f"{hf_server.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    _check_chat(answer.choices[0].logprobs.content, answer.choices[0].message.content, 2)

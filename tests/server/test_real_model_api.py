"""The real model (SmolLM2-135M-Instruct) served over a real socket: `/v1/chat/completions` answers
through the official `openai` client, the guide's routes send queries as chat after the configured
system prompt (whose KV blocks every later query reuses), and `/v1/completions` stays raw."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import websockets.sync.client

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from tests.helpers import wait_until
from tests.server.conftest import wait_ready
from tests.server.live_server import LiveServer

SYSTEM = (
    "You are the assistant of a small bakery in Madrid. You answer questions from customers and staff "
    "politely, in one or two short sentences, and you never invent prices or opening hours."
)
ENGINE = {
    "model": "smollm2-135m",
    "device": "cpu",
    "system_prompt": SYSTEM,
    "default_max_new_tokens": 12,
    "max_new_tokens_limit": 32,
}


@pytest.fixture(scope="module")
def live(real_model):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=real_model)
    with LiveServer(create_app(ServerSettings(**ENGINE), engine=engine)) as server:
        wait_ready(server.url)
        yield server
    engine.shutdown()


def _templated(real_model, query: str) -> list[int]:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": query}]
    return real_model.tokenizer.encode(real_model.tokenizer.apply_chat_template(turns))


def test_chat_completions_answer_with_the_real_model(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content, reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


def test_queries_share_the_system_prompts_blocks(live, real_model):
    first = requests.post(
        f"{live.url}/api/query",
        json={"query": "Do you sell croissants?", "max_new_tokens": 2, "response_cache": False},
        timeout=120,
    ).json()
    second = requests.post(
        f"{live.url}/api/query",
        json={"query": "Can I order a birthday cake?", "max_new_tokens": 2, "response_cache": False},
        timeout=120,
    ).json()
    a, b = (
        _templated(real_model, "Do you sell croissants?"),
        _templated(real_model, "Can I order a birthday cake?"),
    )
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    system_tokens = len(real_model.tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"))
    assert first["prompt_tokens"] == len(a) and second["prompt_tokens"] == len(b)
    # Every full block of the system turn (and of the user turn's header) came from the cache.
    assert second["cached_tokens"] == shared // 16 * 16 >= system_tokens // 16 * 16 >= 32


def test_websocket_and_batch_queries_are_chat_too(live, real_model):
    query = "Are you open on Sundays?"
    with websockets.sync.client.connect(f"{live.ws_url}/ws/query") as ws:
        ws.send(json.dumps({"query": query, "max_new_tokens": 1}))
        answer = json.loads(ws.recv(timeout=120))
    assert answer["prompt_tokens"] == len(_templated(real_model, query))
    batch = [{"query": query, "max_new_tokens": 1}, {"query": query, "max_new_tokens": 1, "raw": True}]
    accepted = requests.post(f"{live.url}/api/batch", json=batch, timeout=30).json()
    results = []
    for task in accepted["task_ids"]:
        status = wait_until(
            lambda t=task: (
                (s := requests.get(f"{live.url}/api/task/{t}", timeout=30).json())["status"] != "processing"
                and s
            ),
            120,
            message="the batch task",
        )
        assert status["status"] == "completed", status
        results.append(status["result"]["prompt_tokens"])
    # The batch's query is chat too; `raw: true` sends the text as it is.
    assert results == [len(_templated(real_model, query)), len(real_model.tokenizer.encode(query))]


def test_completions_stay_raw(live, real_model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    prompt = "The capital of France is"
    reply = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == len(real_model.tokenizer.encode(prompt))
    assert "Paris" in reply.choices[0].text

"""The Celery tasks' queries are chat: the task body hands the guide's request dict to the worker's
engine, which sends the query as a user turn after the system prompt through the chat template. Run
eagerly in this process (`apply`), on an engine over a tiny model with a template of its own."""

from __future__ import annotations

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.integrations.celery import tasks, worker_engine


@pytest.fixture
def chat_engine(chat_model, monkeypatch):
    config = KVCacheConfig(model="demo", device="cpu", system_prompt="Be terse.", default_max_new_tokens=1)
    with UltraAdaptiveKVCacheEngine(config, model=chat_model) as engine:
        monkeypatch.setattr(worker_engine, "_engine", engine)
        yield engine


def test_celery_tasks_send_queries_as_chat(chat_engine, chat_model):
    templated = chat_model.tokenizer.encode(
        "<|system|>Be terse.\n<|user|>Create marketing strategy\n<|assistant|>"
    )
    one = tasks.process_document_task.apply(args=[{"query": "Create marketing strategy"}]).get()
    assert one["prompt_tokens"] == len(templated)
    batch = tasks.batch_process_task.apply(
        args=[[{"query": "Create marketing strategy"}, {"query": "Create marketing strategy", "raw": True}]]
    ).get()
    assert [r["prompt_tokens"] for r in batch] == [
        len(templated),
        len(chat_model.tokenizer.encode("Create marketing strategy")),
    ]

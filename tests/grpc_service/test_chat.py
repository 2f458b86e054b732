"""gRPC queries are chat: `ProcessQuery` sends the query as a user turn after the configured system
prompt, through the model's chat template (a tiny model with a template of its own)."""

from __future__ import annotations

import grpc

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.grpc_service.generated import bul_pb2, bul_pb2_grpc
from bulk.grpc_service.server import start_server


async def test_process_query_goes_through_the_chat_template(chat_model):
    config = KVCacheConfig(model="demo", device="cpu", system_prompt="Be terse.", default_max_new_tokens=1)
    with UltraAdaptiveKVCacheEngine(config, model=chat_model) as engine:
        running = await start_server(engine, "127.0.0.1", 0)
        try:
            await running.warm_up()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = bul_pb2_grpc.BULServiceStub(channel)
                reply = await stub.ProcessQuery(
                    bul_pb2.QueryRequest(query="Create marketing strategy"), timeout=60
                )
        finally:
            await running.stop(grace=None)
    templated = chat_model.tokenizer.encode(
        "<|system|>Be terse.\n<|user|>Create marketing strategy\n<|assistant|>"
    )
    assert reply.prompt_tokens == len(templated)
    assert reply.prompt_tokens > len(chat_model.tokenizer.encode("Create marketing strategy"))

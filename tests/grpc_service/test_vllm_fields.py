"""vLLM's extra sampling fields over gRPC: `QueryRequest.ignore_eos` and `min_tokens` reach the
engine (set, even to their defaults, they are sent; unset, the engine's defaults apply). Bad values
are INVALID_ARGUMENT naming the field (tests/grpc_service/test_service.py)."""

from __future__ import annotations

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.grpc_service import convert
from bulk.grpc_service.generated import bul_pb2
from tests.conftest import ENDS_EARLY


@pytest.fixture
def engine(eos_model):
    """The servers of tests/grpc_service/conftest.py, over `eos_model`: its greedy answer to
    `ENDS_EARLY` ends after 2 tokens ("XX")."""
    config = KVCacheConfig(model="demo", device="cpu", dtype="float32", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config, model=eos_model) as engine:
        yield engine


async def test_both_fields_reach_the_engine(stub):
    async def ask(**fields) -> bul_pb2.QueryResponse:
        return await stub.ProcessQuery(bul_pb2.QueryRequest(query=ENDS_EARLY, max_new_tokens=8, **fields))

    plain, forced, held = await ask(), await ask(ignore_eos=True), await ask(min_tokens=5)
    assert (plain.result, plain.completion_tokens, plain.finish_reason) == ("XX", 2, "stop")
    assert (forced.result, forced.completion_tokens, forced.finish_reason) == ("XXJXJXJX", 8, "length")
    assert (held.result, held.completion_tokens) == ("XXXXX", 5)

    call = stub.StreamQuery(bul_pb2.QueryRequest(query=ENDS_EARLY, max_new_tokens=8, ignore_eos=True))
    chunks = [chunk async for chunk in call]
    assert "".join(c.token for c in chunks[:-1]) == "XXJXJXJX"
    assert chunks[-1].response.completion_tokens == 8


def test_presence_decides_what_is_sent():
    unset = convert.request_to_engine(bul_pb2.QueryRequest(query="q"))
    assert not {"ignore_eos", "min_tokens"} & unset.keys()
    explicit = convert.request_to_engine(bul_pb2.QueryRequest(query="q", ignore_eos=False, min_tokens=0))
    assert (explicit["ignore_eos"], explicit["min_tokens"]) == (False, 0)

"""The router's chain of a request is the engine's own: the blocks a replica stores are named exactly
as the router names them, for raw queries, chat-template queries and conversations."""

from __future__ import annotations

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.routing.chains import (
    RequestChains,
    block_id,
    load_tokenizer,
    pack_block_ids,
    unpack_block_ids,
)
from tests.helpers import wait_until

PROMPT = "You are the planning assistant of a small bakery in Madrid. " * 3


def _engine_blocks(engine: UltraAdaptiveKVCacheEngine, payload: dict) -> tuple[bytes, set[int]]:
    engine.process_request_sync({**payload, "max_new_tokens": 1, "response_cache": False})
    cached = engine.cached_blocks()
    return bytes.fromhex(cached["namespace"]), {block_id(d) for d in cached["digests"]}


@pytest.mark.parametrize(
    "payload",
    [
        {"query": PROMPT},
        {"query": PROMPT, "raw": True},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": PROMPT}]},
    ],
)
@pytest.mark.parametrize("model", ["demo_model", "chat_model"])
def test_the_routers_chain_names_the_blocks_the_engine_stores(model, payload, request):
    lm = request.getfixturevalue(model)
    config = KVCacheConfig(model=lm.name, device="cpu")
    with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
        namespace, stored = _engine_blocks(engine, payload)
    chains = RequestChains(config, tokenizer=load_tokenizer(config))
    key = chains.key(payload, namespace)
    assert key is not None and len(key.chain) >= 4
    # The prompt's full blocks (the engine also stores the answer's, which the router cannot know).
    assert set(key.chain) <= stored


def test_without_a_namespace_or_a_tokenizer_there_is_no_chain():
    config = KVCacheConfig(model="demo", device="cpu")
    ready = RequestChains(config, tokenizer=load_tokenizer(config))
    assert ready.key({"query": PROMPT}, None).chain == ()
    assert ready.key({"query": PROMPT}, b"\x00" * 32).chain


def test_a_request_the_engine_refuses_has_no_key():
    config = KVCacheConfig(model="demo", device="cpu")
    chains = RequestChains(config, tokenizer=load_tokenizer(config))
    assert chains.key({"query": "   "}, b"\x00" * 32) is None
    assert chains.key({"query": "x", "max_new_tokens": 10**9}, b"\x00" * 32) is None


def test_sessions():
    config = KVCacheConfig(model="demo", device="cpu")
    chains = RequestChains(config, tokenizer=load_tokenizer(config))
    ns = b"\x01" * 32
    explicit = chains.key({"query": "hi", "session_id": "user-7"}, ns)
    assert (explicit.session, explicit.sticky) == ("user-7", True)
    opening = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]
    first = chains.key({"messages": opening}, ns)
    later = chains.key(
        {
            "messages": [
                *opening,
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "More"},
            ]
        },
        ns,
    )
    # One conversation, one session; it binds once the chat has an earlier assistant turn.
    assert first.session == later.session and first.session.startswith("chat:")
    assert (first.sticky, later.sticky) == (False, True)
    assert chains.key({"query": "hi"}, ns).session is None


def test_block_ids_pack_into_eight_bytes_each():
    digests = [bytes([i]) * 32 for i in range(5)]
    packed = pack_block_ids(digests)
    assert len(packed) == 40
    assert unpack_block_ids(packed) == {block_id(d) for d in digests}
    with pytest.raises(ValueError):
        unpack_block_ids(b"\x00" * 7)


def test_the_tokenizer_loads_on_its_own_thread(chat_model):
    config = KVCacheConfig(model=str(chat_model.name), device="cpu")
    chains = RequestChains(config)
    wait_until(lambda: chains.ready, 30, 0.01, "the tokenizer to load")
    assert chains.key({"query": PROMPT}, b"\x00" * 32).chain

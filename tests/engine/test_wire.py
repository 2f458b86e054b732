"""What crosses a process boundary as data (a cluster's ingress to its replicas): a checked request as
its request dict, an error as its class name, field and message."""

from __future__ import annotations

import json

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.protocol import ServingEngine
from bulk.engine.request import parse_request
from bulk.errors import (
    BulError,
    EngineClosedError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    RemoteError,
    error_data,
    error_from_data,
)

CONFIG = KVCacheConfig(model="demo", system_prompt="Be brief.")


@pytest.mark.parametrize(
    "payload",
    [
        {"query": "Create marketing strategy"},
        {"text": "raw text", "raw": True, "priority": 3, "max_new_tokens": 7},
        {"query": "x", "temperature": 0.7, "top_p": 0.9, "seed": 11, "stop": ["\n", "END"]},
        {"query": "x", "session_id": "s-1", "response_cache": False, "request_id": "mine"},
        {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": None}], "response_cache": True},
    ],
)
def test_a_parsed_request_crosses_as_its_request_dict(payload):
    request = parse_request(payload, CONFIG)
    wire = request.to_payload()
    assert json.loads(json.dumps(wire)) == wire  # plain JSON data
    again = parse_request(wire, CONFIG)
    assert again.request_id == request.request_id and again.request_id_given
    assert again.__dict__ | {"request_id_given": request.request_id_given} == request.__dict__


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("max_new_tokens", "must be between 1 and 8"),
        PromptTooLongError("query", "the prompt is 5001 tokens"),
        InvalidConfigError("BUL_MAX_TOKENS", "must be >= 1"),
        EngineClosedError("the engine was shut down"),
        ModelLoadError("cannot load model 'x'"),
        BulError("something of ours"),
    ],
)
def test_our_errors_keep_their_type_field_and_message(error):
    data = error_data(error)
    assert json.loads(json.dumps(data)) == data
    again = error_from_data(data)
    assert type(again) is type(error) and str(again) == str(error)
    if isinstance(error, InvalidRequestError):
        assert (again.field, again.message) == (error.field, error.message)


def test_any_other_error_crosses_by_name_only():
    data = error_data(KeyError("secret detail"))
    assert data == {"type": "RemoteError", "field": None, "message": "KeyError"}
    again = error_from_data(data)
    assert isinstance(again, RemoteError) and not isinstance(again, BulError)
    assert "secret" not in str(again) and again.type_name == "KeyError"
    assert isinstance(error_from_data({"type": "os.system", "message": 3}), RemoteError)


def test_the_local_engine_is_a_serving_engine(demo_model):
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu"), model=demo_model) as engine:
        assert isinstance(engine, ServingEngine)
        engine.process_request_sync({"query": "cached blocks " * 4, "max_new_tokens": 1})
        cached = engine.cached_blocks()
        assert cached["namespace"] and cached["block_size"] == 16 and cached["capacity_blocks"] == 512
        assert len(cached["digests"]) >= 3 and all(len(d) == 32 for d in cached["digests"])
        assert len(engine.cached_blocks(limit=2)["digests"]) == 2

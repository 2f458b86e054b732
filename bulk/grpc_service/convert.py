"""Messages <-> the engine's dicts. Checking values is the engine's job (it raises
`InvalidRequestError` naming the field); here only presence is decided: a field the client did not
set is left out, so the engine applies its own default."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from bulk.engine.request import FIELDS
from bulk.engine.result import LOGPROBS_FIELD, RESULT_FIELDS
from bulk.engine.stats import COUNTS
from bulk.grpc_service.generated import bul_pb2

# Request fields `QueryRequest` does not carry (the test of the schemas checks the proto against
# `FIELDS` minus these): `text` is the guide's other name for `query`; a raw prompt and a conversation
# are the REST and OpenAI faces' (gRPC sends a query through the chat template), and so are the
# tools offered to a conversation.
NOT_IN_PROTO = frozenset(("text", "raw", "messages", "tools"))
# Repeated fields: sent when not empty (proto3 cannot tell an empty list from none).
_REPEATED_FIELDS = ("stop", "logit_bias", "stop_token_ids")
# Fields sent as a `google.protobuf.Struct` (a JSON object): given when set, as a plain dict.
_STRUCT_FIELDS = ("structured_outputs",)
# Every other field but `query` (always sent), the repeated and the Struct ones has explicit presence
# and maps one to one onto the engine's request key: unset means the engine's default.
_OPTIONAL_FIELDS = tuple(
    name for name in FIELDS if name not in NOT_IN_PROTO | {"query", *_REPEATED_FIELDS, *_STRUCT_FIELDS}
)
# Result fields whose proto name differs (the unit in the name, as proto style asks).
RESPONSE_NAMES = {"latency": "latency_ms"}
_EMPTY = {bool: False, float: 0.0, int: 0, str: ""}


def request_to_engine(message: bul_pb2.QueryRequest) -> dict[str, Any]:
    request: dict[str, Any] = {"query": message.query}
    for name in _OPTIONAL_FIELDS:
        if message.HasField(name):
            request[name] = getattr(message, name)
    if message.stop:
        request["stop"] = list(message.stop)
    if message.logit_bias:
        # The engine's (and OpenAI's) form: token id -> bias; a repeated id: the last one counts.
        request["logit_bias"] = {str(entry.token_id): entry.bias for entry in message.logit_bias}
    if message.stop_token_ids:
        request["stop_token_ids"] = list(message.stop_token_ids)
    for name in _STRUCT_FIELDS:
        if message.HasField(name):
            request[name] = struct_to_dict(getattr(message, name))
    return request


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as the plain dict it holds. Struct numbers are doubles, so an integral one becomes an
    int again: a JSON schema's `maxLength`, `minItems`, ... must be integers (`10`, not `10.0`),
    and `minimum: 0` means the same either way."""
    return _integral(json_format.MessageToDict(struct))


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def result_to_response(result: Mapping[str, Any]) -> bul_pb2.QueryResponse:
    """Every `RESULT_FIELDS` field; a missing or None value is the proto's empty value. `logprobs`,
    which an answer holds only when its request asked (`bulk.engine.result.LOGPROBS_FIELD`), too."""
    fields: dict[str, Any] = {}
    for name in RESULT_FIELDS:
        proto_name = RESPONSE_NAMES.get(name, name)
        value = result.get(name)
        kind = _PROTO_TYPES[proto_name]
        fields[proto_name] = _EMPTY[kind] if value is None else kind(value)
    entries = result.get(LOGPROBS_FIELD)
    if entries:
        fields[LOGPROBS_FIELD] = logprobs_to_proto(entries)
    return bul_pb2.QueryResponse(**fields)


def logprobs_to_proto(entries: list[Mapping[str, Any]]) -> list[bul_pb2.TokenLogprobs]:
    return [
        bul_pb2.TokenLogprobs(
            **_token_logprob(entry),
            top_logprobs=[bul_pb2.TokenLogprob(**_token_logprob(top)) for top in entry["top_logprobs"]],
        )
        for entry in entries
    ]


def _token_logprob(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "token_id": entry["token_id"],
        "token": entry["token"],
        "bytes": bytes(entry["bytes"]),
        "logprob": entry["logprob"],
    }


_PYTHON_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_STRING: str,
}
# The scalar fields (`RESULT_FIELDS`'); the repeated message `logprobs` is converted apart.
_PROTO_TYPES = {
    f.name: _PYTHON_TYPES[f.type] for f in bul_pb2.QueryResponse.DESCRIPTOR.fields if f.type in _PYTHON_TYPES
}


def stats_to_response(stats: Mapping[str, Any]) -> bul_pb2.StatsResponse:
    """The typed fields for the keys every engine has; `details` carries the whole dict, so keys
    added to the engine later reach clients before this message grows a field for them."""
    counters: dict[str, Any] = {name: int(stats.get(name) or 0) for name in COUNTS}
    response = bul_pb2.StatsResponse(
        **counters,
        hit_rate=float(stats.get("hit_rate") or 0.0),
        token_hit_rate=float(stats.get("token_hit_rate") or 0.0),
        model=str(stats.get("model", "")),
        ready=bool(stats.get("ready", False)),
        latency_ms=_latency(stats.get("latency_ms")),
        ttft_ms=_latency(stats.get("ttft_ms")),
        response_cache=bul_pb2.ResponseCacheStats(
            **{name: int((stats.get("response_cache") or {}).get(name) or 0) for name in _CACHE_COUNTERS}
        ),
        details=_struct(stats),
    )
    for name, tier in (stats.get("tiers") or {}).items():
        response.tiers[name].CopyFrom(
            bul_pb2.TierStats(
                **{key: int(tier.get(key) or 0) for key in _TIER_COUNTERS},
                healthy=bool(tier.get("healthy", True)),
            )
        )
    return response


_CACHE_COUNTERS = ("entries", "hits", "misses", "size_bytes")
_TIER_COUNTERS = ("hits", "misses", "errors", "size_bytes")


def _latency(summary: Mapping[str, Any] | None) -> bul_pb2.LatencySummary:
    # Percentiles are None before the first request: left unset rather than reported as 0 ms.
    values = {key: float(value) for key, value in (summary or {}).items() if value is not None}
    return bul_pb2.LatencySummary(**{k: v for k, v in values.items() if k in ("p50", "p95", "p99", "mean")})


def _struct(stats: Mapping[str, Any]) -> struct_pb2.Struct:
    # A JSON round trip turns tuples into lists and anything unexpected into a string, which is
    # what Struct accepts; get_stats() is JSON-able by contract, so this loses nothing there.
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(stats, default=str)))
    return struct

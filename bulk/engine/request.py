"""Turning a request dict (the guide's `{"query": ...}` or `{"text": ...}`) into a checked
`GenerationRequest`. Every way a request can be wrong raises `InvalidRequestError` naming the field."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bulk.config import KVCacheConfig
from bulk.engine import chat
from bulk.engine.tools import parse_tools
from bulk.errors import InvalidRequestError
from bulk.generation.sampling import MAX_LOGPROBS, SamplingParams
from bulk.generation.structured import parse_constraint

# The one list of a request dict's fields. The faces follow it (`tests/test_schemas.py` fails when one
# does not): the API's `QueryRequest`, gRPC's `QueryRequest` message and its conversion, and
# `GenerationRequest.to_payload`.
FIELDS = (
    "query",
    "text",
    "priority",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "session_id",
    "stop",
    "ignore_eos",
    "min_tokens",
    "response_cache",
    "request_id",
    "raw",
    "messages",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "stop_token_ids",
    "structured_outputs",
    "tools",
)
_KNOWN = frozenset(FIELDS)
MAX_STOP_STRINGS = 8
# The faces read the sampler's limit on logprobs here (`MAX_LOGPROBS`, imported above): they reach
# the generation layer only through the engine.
# Bounds on the per-token lists a request may carry (each entry costs work on every step).
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
_ids = itertools.count()
# Unique across processes (the pid: forked workers share what was imported before the fork) and
# restarts (a random part), without a uuid4 per request on the hot path.
_ID_PREFIX = uuid.uuid4().hex[:8]


def _request_id() -> str:
    return f"req-{_ID_PREFIX}{os.getpid():x}-{next(_ids)}"


@dataclass(frozen=True)
class GenerationRequest:
    # The request's input as one string, on which the response cache keys answers: a query's own
    # text, a tagged form for a raw prompt or a conversation (`chat.request_prompt`). The model is
    # given `prompt_text(tokenizer)`.
    prompt: str
    params: SamplingParams
    priority: int = 1
    session_id: str | None = None
    # None: use the response cache only when the request is deterministic.
    response_cache: bool | None = None
    request_id: str = field(default_factory=_request_id)
    # True when the caller chose `request_id`; a `renewed` copy keeps it then.
    request_id_given: bool = False
    # What the model is given (`bulk.engine.chat`): `query` as a user turn after `system_prompt`
    # through the chat template; `query` as it is when `raw`; or the conversation `messages`.
    query: str = ""
    raw: bool = False
    messages: tuple[chat.Turn, ...] = ()
    system_prompt: str | None = None
    # OpenAI's function tools offered to a conversation (`bulk.engine.tools.parse_tools`).
    tools: tuple[dict[str, Any], ...] = ()

    def prompt_text(self, tokenizer: Any) -> str:
        """The text the model is given, rendered with the model's `tokenizer` (its chat template)."""
        return chat.render_prompt(self, tokenizer)

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        """The token ids the model is given: those the engine computes and stores blocks for, and
        those a cluster's router hashes to find the replica holding them."""
        return tokenizer.encode(self.prompt_text(tokenizer))

    def renewed(self) -> GenerationRequest:
        """This request again, with a fresh request id unless the caller chose one: a parsed request
        reused for an identical body (the API's hot path) instead of parsing it again."""
        if self.request_id_given:
            return self
        copy = object.__new__(GenerationRequest)
        copy.__dict__.update(self.__dict__, request_id=_request_id())
        return copy

    @property
    def use_response_cache(self) -> bool:
        # An answer with logprobs is never cached: the cache keeps scalar fields only (see
        # `response_cache.StoredAnswer`), and a caller asking for logprobs wants the model's numbers.
        if self.params.logprobs is not None:
            return False
        return self.params.deterministic if self.response_cache is None else self.response_cache

    def to_payload(self) -> dict[str, Any]:
        """This request as the plain request dict (JSON-ready) that `parse_request` turns back into an
        equal request under the same configuration: how a checked request crosses a process boundary
        (a cluster's ingress to a replica) as data. The request id always goes along, so both sides
        name the request alike. Every field of `FIELDS` that the request holds is written (`text` as
        `query`, its other name), as `tests/test_schemas.py` checks."""
        params = self.params
        payload: dict[str, Any] = {
            "priority": self.priority,
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "request_id": self.request_id,
        }
        if self.messages:
            payload["messages"] = [chat.turn_message(turn) for turn in self.messages]
            if self.tools:
                payload["tools"] = list(self.tools)
        else:
            payload["query"] = self.query
            if self.raw:
                payload["raw"] = True
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.ignore_eos:
            payload["ignore_eos"] = True
        if params.min_tokens:
            payload["min_tokens"] = params.min_tokens
        if params.logprobs is not None:
            payload["logprobs"] = params.logprobs
        if params.presence_penalty:
            payload["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            payload["frequency_penalty"] = params.frequency_penalty
        if params.repetition_penalty != 1.0:
            payload["repetition_penalty"] = params.repetition_penalty
        if params.logit_bias:
            # JSON object keys are strings, as OpenAI's `logit_bias` writes token ids.
            payload["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if params.stop_token_ids:
            payload["stop_token_ids"] = list(params.stop_token_ids)
        if params.constraint is not None:
            payload["structured_outputs"] = params.constraint.to_payload()
        if self.session_id is not None:
            payload["session_id"] = self.session_id
        if self.response_cache is not None:
            payload["response_cache"] = self.response_cache
        return payload


def parse_request(query: Any, config: KVCacheConfig) -> GenerationRequest:
    if isinstance(query, GenerationRequest):
        return query
    if not isinstance(query, Mapping):
        raise InvalidRequestError("query", f"a request must be a JSON object, got {type(query).__name__}")
    if not _KNOWN.issuperset(query):
        unknown = sorted(str(k) for k in query if k not in _KNOWN)
        raise InvalidRequestError(unknown[0], f"unknown field (allowed: {', '.join(FIELDS)})")
    if "query" in query and "text" in query:
        raise InvalidRequestError("query", "give either 'query' or 'text', not both")
    name = "text" if "text" in query else "query"
    prompt = query.get(name)
    messages: tuple[chat.Turn, ...] = ()
    raw = query.get("raw", False)
    if not isinstance(raw, bool):
        raise InvalidRequestError("raw", "must be true or false")
    if query.get("messages") is not None:
        if prompt is not None:
            raise InvalidRequestError("messages", f"give either 'messages' or '{name}', not both")
        if raw:
            raise InvalidRequestError("raw", "a conversation ('messages') is always rendered as a chat")
        messages = chat.parse_messages(query["messages"])
        prompt = ""
    elif prompt is None:
        raise InvalidRequestError("query", "missing: the request needs a 'query' (or 'text') string")
    elif not isinstance(prompt, str):
        raise InvalidRequestError(name, f"must be a string, got {type(prompt).__name__}")
    elif not prompt.strip():
        raise InvalidRequestError(name, "must not be empty")
    if query.get("tools") and not messages:
        raise InvalidRequestError("tools", "tools are offered to a conversation ('messages')")
    tools = parse_tools(query.get("tools"))

    max_new_tokens = _int(query, "max_new_tokens", config.default_max_new_tokens)
    if not 1 <= max_new_tokens <= config.max_new_tokens_limit:
        raise InvalidRequestError("max_new_tokens", f"must be between 1 and {config.max_new_tokens_limit}")
    temperature = _number(query, "temperature", 0.0)
    if not 0.0 <= temperature <= 5.0:
        raise InvalidRequestError("temperature", "must be between 0 and 5")
    top_p = _number(query, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError("top_p", "must be in (0, 1]")
    seed = _int(query, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidRequestError("seed", "must be a non-negative 64-bit integer")
    ignore_eos = query.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise InvalidRequestError("ignore_eos", "must be true, false or null")
    min_tokens = _int(query, "min_tokens", 0)
    if not 0 <= min_tokens <= max_new_tokens:
        # vLLM refuses it too: the answer could never hold that many tokens.
        raise InvalidRequestError(
            "min_tokens", f"must be between 0 and the request's maximum of new tokens ({max_new_tokens})"
        )
    logprobs = _int(query, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(
            "logprobs", f"must be between 0 and {MAX_LOGPROBS} (alternatives per token)"
        )
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _number(query, name, 0.0)
        if not -2.0 <= penalties[name] <= 2.0:
            raise InvalidRequestError(name, "must be between -2 and 2")
    repetition_penalty = _number(query, "repetition_penalty", 1.0)
    # Above 0 (vLLM's rule), and bounded so that a logit divided or multiplied by it stays finite: an
    # infinite one would fail the whole step's sampling, the other rows' with it.
    if not MIN_REPETITION_PENALTY <= repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequestError(
            "repetition_penalty",
            f"must be between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY:g} (1 changes nothing)",
        )
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(query.get("stop")),
        ignore_eos=bool(ignore_eos),
        min_tokens=min_tokens,
        logprobs=logprobs,
        repetition_penalty=repetition_penalty,
        logit_bias=_logit_bias(query.get("logit_bias")),
        stop_token_ids=_token_ids(query.get("stop_token_ids"), "stop_token_ids", MAX_STOP_TOKEN_IDS),
        constraint=parse_constraint(query.get("structured_outputs")),
        **penalties,
    )
    response_cache = query.get("response_cache")
    if response_cache is not None and not isinstance(response_cache, bool):
        raise InvalidRequestError("response_cache", "must be true, false or null")
    extra: dict[str, Any] = {}
    if query.get("request_id") is not None:
        extra["request_id"] = _str(query, "request_id")
        extra["request_id_given"] = True
    return GenerationRequest(
        prompt=chat.request_prompt(prompt, raw=raw, messages=messages, tools=tools),
        params=params,
        priority=_int(query, "priority", 1),
        session_id=_str(query, "session_id") if query.get("session_id") is not None else None,
        response_cache=response_cache,
        query=prompt,
        raw=raw,
        messages=messages,
        system_prompt=config.system_prompt,
        tools=tools,
        **extra,
    )


def check_constraint(value: Any, field: str) -> Any:
    """A structured-output request value (the engine's `structured_outputs`), checked under the
    name a face gave it (`response_format.json_schema.schema`, `guided_json`, ...): an
    `InvalidRequestError` naming that field, or `value` unchanged. The engine checks it again when
    it parses the request, from a cache."""
    kind = next(iter(value), None) if isinstance(value, Mapping) and len(value) == 1 else None
    if kind is None or field == "structured_outputs":
        parse_constraint(value, field)
        return value
    try:
        parse_constraint(value)
    except InvalidRequestError as exc:
        raise InvalidRequestError(field, exc.message) from None
    return value


def _int(query: Mapping[str, Any], key: str, default: int | None) -> Any:
    value = query.get(key)
    if value is None:
        return default
    # bool is an int in Python, but `"priority": true` is a mistake, not a priority.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(key, f"must be an integer, got {type(value).__name__}")
    return value


def _number(query: Mapping[str, Any], key: str, default: float) -> float:
    value = query.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidRequestError(key, f"must be a number, got {type(value).__name__}")
    return float(value)


def _str(query: Mapping[str, Any], key: str) -> str:
    value = query.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidRequestError(key, "must be a non-empty string of at most 256 characters")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(stops)


def _token_id(value: Any, name: str) -> int:
    """A token id: an int, or its decimal string (JSON object keys are strings). The model's
    vocabulary bounds it at intake (`ModelRunner.tokenize`), where the tokenizer is known."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise InvalidRequestError(name, f"token ids must be non-negative integers, got {value!r:.40}")
    return value


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequestError("logit_bias", "must be an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        token = _token_id(key, "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100.0 <= bias <= 100.0:
            raise InvalidRequestError(
                "logit_bias", f"token {token}: the bias must be a number between -100 and 100"
            )
        biases[token] = float(bias)
    # Ordered, so that equal maps make equal (and equally cached) requests.
    return tuple(sorted((token, bias) for token, bias in biases.items() if bias != 0.0))


def _token_ids(value: Any, name: str, limit: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequestError(name, "must be a list of token ids")
    if len(value) > limit:
        raise InvalidRequestError(name, f"at most {limit} token ids")
    return tuple(sorted({_token_id(token, name) for token in value}))

"""The published OpenAPI schema states the limits the API enforces, so that generated clients and
fuzzers see the API as it is (tests/server/test_schemathesis.py fails on any request generated from
the schema that the API rejects, and on any it accepts that the schema forbids).

FastAPI writes the types from the pydantic models. The limits are enforced elsewhere: by the engine
(`bulk/engine/request.py`: `max_new_tokens` up to `max_new_tokens_limit`, `temperature`, `top_p`,
`seed`, `stop`, `min_tokens`, the ids, a query that is not blank, `query` or `text` but not both) and
by the server's settings (`schemas.check_limits`: prompt length, priority range; the batch size).
They are written into the schema here, from the same settings, once, when it is first built. JSON Schema
applies `minimum`, `maxLength`, `maxItems`, `items` only to values of their type, so each limit sits
on its property beside the property's `anyOf` of types, and null stays allowed where it was.
`min_tokens` is bounded here by `max_new_tokens_limit`; that it is not above the request's own
`max_new_tokens` relates two fields, which JSON Schema cannot state (the test allows that 422), as
does chat's `top_logprobs` needing `logprobs: true`; and token ids (`logit_bias`, `stop_token_ids`)
must be in the model's vocabulary, which the schema does not know.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from bulk.engine.request import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_REPETITION_PENALTY,
)
from bulk.server.openai_schemas import MAX_CHOICES
from bulk.server.settings import ServerSettings

# The engine's own limits (bulk/engine/request.py).
TEMPERATURE = {"minimum": 0, "maximum": 5}
TOP_P = {"exclusiveMinimum": 0, "maximum": 1}
SEED = {"minimum": 0, "maximum": 2**63 - 1}
ID = {"minLength": 1, "maxLength": 256}
STOP = {"minLength": 1, "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}}
LOGPROBS = {"minimum": 0, "maximum": MAX_LOGPROBS}
CHOICES = {"minimum": 1, "maximum": MAX_CHOICES}
PENALTY = {"minimum": -2, "maximum": 2}
REPETITION_PENALTY = {"minimum": MIN_REPETITION_PENALTY, "maximum": MAX_REPETITION_PENALTY}
# Token ids: the model's vocabulary bounds them too, which the schema cannot know before the model is
# loaded (a 422 naming the field, as for `min_tokens` above `max_new_tokens`).
TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
LOGIT_BIAS = {
    "maxProperties": MAX_LOGIT_BIAS,
    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
    "additionalProperties": {"minimum": -100, "maximum": 100},
}
STOP_TOKEN_IDS = {"maxItems": MAX_STOP_TOKEN_IDS, "items": TOKEN_ID}
# A prompt that is only whitespace is refused ("must not be empty": `str.strip()`), so a prompt must
# hold one character outside Python's whitespace. Spelled out: a regex `\S` means other sets in
# other dialects (ECMA's leaves out U+001C-U+001F and U+0085, and adds U+FEFF).
NOT_BLANK = r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# `structured_outputs` (bulk/generation/structured.py's `parse_constraint`, which the faces reach
# only through the engine, hence its limits written here): exactly one kind of constraint. That a
# regex, a grammar or a JSON schema can be served (compiles, uses no unsupported keyword such as
# `not`) JSON Schema cannot state: the engine answers 422 naming `structured_outputs.<kind>`.
MAX_CHOICES_STRUCTURED = 1024  # structured.MAX_CHOICES
STRUCTURED_OUTPUTS = {
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
    "properties": {
        "json": {"type": ["object", "string"], "description": "A JSON schema, or its JSON text."},
        "json_object": {"const": True, "description": "Any JSON object."},
        "regex": {"type": "string", "pattern": NOT_BLANK, "description": "A regular expression."},
        "choice": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CHOICES_STRUCTURED,
            "items": {"type": "string", "minLength": 1},
            "description": "The answer is one of these strings.",
        },
        "grammar": {"type": "string", "pattern": NOT_BLANK, "description": "A Lark or GBNF grammar."},
    },
}


def install_openapi(app: FastAPI, settings: ServerSettings, max_new_tokens_limit: int) -> None:
    """Make `app.openapi()` (and `/openapi.json`, `/docs`) state the limits of these settings."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            state_limits(build(), settings, max_new_tokens_limit)  # FastAPI caches what it built
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def state_limits(schema: dict[str, Any], settings: ServerSettings, max_new_tokens_limit: int) -> None:
    """Add the limits to `schema` in place. Models or properties absent from it are skipped."""
    components = schema.get("components", {}).get("schemas", {})
    prompt: dict[str, Any] = {"maxLength": settings.max_query_chars, "pattern": NOT_BLANK}
    tokens: dict[str, Any] = {"minimum": 1, "maximum": max_new_tokens_limit}
    sampling: dict[str, Any] = {
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "seed": SEED,
        "stop": STOP,
        "min_tokens": {"minimum": 0, "maximum": max_new_tokens_limit},
        "presence_penalty": PENALTY,
        "frequency_penalty": PENALTY,
        "repetition_penalty": REPETITION_PENALTY,
        "logit_bias": LOGIT_BIAS,
        "stop_token_ids": STOP_TOKEN_IDS,
    }

    query = components.get("QueryRequest")
    _constrain(
        query,
        {
            "query": prompt,
            "text": prompt,
            "priority": {"minimum": settings.min_priority, "maximum": settings.max_priority},
            "max_new_tokens": tokens,
            "session_id": ID,
            "request_id": ID,
            "logprobs": LOGPROBS,
            "structured_outputs": STRUCTURED_OUTPUTS,
            **sampling,
        },
    )
    if query is not None:
        # Exactly one of the two names carries the prompt (a null one counts as absent).
        query["oneOf"] = [
            {"required": [name], "properties": {name: {"type": "string"}}} for name in ("query", "text")
        ]
    completion_prompt = {**prompt, "minItems": 1, "maxItems": 1, "items": {"type": "string", **prompt}}
    _constrain(
        components.get("CompletionRequest"),
        {"prompt": completion_prompt, "max_tokens": tokens, "logprobs": LOGPROBS, "n": CHOICES, **sampling},
    )
    _constrain(
        components.get("ChatCompletionRequest"),
        {
            "max_tokens": tokens,
            "max_completion_tokens": tokens,
            "top_logprobs": LOGPROBS,
            "n": CHOICES,
            **sampling,
        },
    )
    # The whole conversation's text is limited to max_query_chars; each message's text at least is.
    _constrain(components.get("ChatMessage"), {"content": {"maxLength": settings.max_query_chars}})
    _constrain(components.get("TextPart"), {"text": {"maxLength": settings.max_query_chars}})

    batch = _json_body(schema, "/api/batch")
    if batch is not None:
        batch.update(minItems=1, maxItems=settings.max_batch_queries)


def _constrain(model: dict[str, Any] | None, limits: dict[str, dict[str, Any]]) -> None:
    properties = (model or {}).get("properties", {})
    for name, keywords in limits.items():
        if name in properties:
            properties[name].update(keywords)


def _json_body(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    operation = schema.get("paths", {}).get(path, {}).get("post", {})
    return operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")

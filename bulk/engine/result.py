"""The engine's answer to one request: `GenerationResult`, the one list of its fields.

Every face derives from it: the response cache (which fields belong to the request rather than to
the stored answer), the WebSocket route, gRPC's `QueryResponse` (`tests/engine/test_schemas.py`
checks the proto against `RESULT_FIELDS`), the CLI. Adding a field is one edit here plus where its
value is computed (`Sequence.result`); the test names every other place that must follow."""

from __future__ import annotations

from typing import TypedDict


class GenerationResult(TypedDict):
    # The generated text (cut before a stop string).
    result: str
    # True when any of the prompt's KV came from a cache (the prefix cache or the response cache).
    cache_hit: bool
    # True when the whole answer came from the response cache, without the model.
    response_cached: bool
    # Milliseconds from the request's arrival to its answer.
    latency: float
    # Milliseconds to the first token (the whole latency on a response-cache hit).
    ttft_ms: float
    # Prompt tokens whose KV came from the prefix cache (all of them on a response-cache hit).
    cached_tokens: int
    prompt_tokens: int
    completion_tokens: int
    # "stop", "length" or "cancelled".
    finish_reason: str | None
    request_id: str
    model: str


RESULT_FIELDS: tuple[str, ...] = tuple(GenerationResult.__annotations__)

# Not one of `RESULT_FIELDS`: an answer holds it only when its request asked for logprobs (the
# request field `logprobs`), as a list of `TokenLogprobs`, one per answer token (`completion_tokens`
# of them, a stop string's tokens included, the end of sequence not). The faces shape it their way
# (OpenAI's chat and legacy completions formats, gRPC's `TokenLogprobs`); a stream's token events
# carry theirs too.
LOGPROBS_FIELD = "logprobs"


class TokenLogprob(TypedDict):
    token_id: int
    # The token's text alone (undecodable bytes as U+FFFD) and its UTF-8 bytes.
    token: str
    bytes: list[int]
    # Natural log of its probability (see `bulk.generation.sampling` for which distribution).
    logprob: float


class TokenLogprobs(TokenLogprob):
    # The request's `logprobs` most likely tokens at that position, most likely first.
    top_logprobs: list[TokenLogprob]


# The fields of an answer from the response cache that belong to the request, not to the stored
# answer: set afresh on every hit (`response_cache.StoredAnswer`).
PER_REQUEST_FIELDS = frozenset(
    ("cache_hit", "response_cached", "cached_tokens", "latency", "ttft_ms", "request_id")
)

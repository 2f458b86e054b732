"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (with SSE streaming) and
`/v1/models`. Any OpenAI client works against them (`base_url="http://host:8002/v1"`).

`usage.prompt_tokens_details.cached_tokens` is always filled: the prompt tokens whose KV came from
the cache (all of them when the whole answer came from the response cache)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bulk.engine.protocol import ServingEngine
from bulk.errors import BulError, InvalidRequestError
from bulk.metrics import PrometheusExporter
from bulk.server.deps import Engine, Metrics, Settings
from bulk.server.disconnect import until_disconnected
from bulk.server.json_input import JSONRoute
from bulk.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    envelope,
    finish_reason,
    usage,
)
from bulk.server.schemas import check_limits
from bulk.server.settings import ServerSettings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONRoute)


@router.get("/models")
async def list_models(settings: Settings) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "bul-kv"}],
    }


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, engine: Engine, settings: Settings, metrics: Metrics
) -> Response:
    prompt = body.prompt_text()
    if prompt is None:
        raise InvalidRequestError("prompt", "give one prompt (a string, or a list holding exactly one)")
    # Raw completion: the prompt goes to the model as it is, without the chat template.
    payload = {"query": prompt, "raw": True, **body.engine_params()}
    check_limits(payload, settings)
    return await _answer(request, engine, settings, metrics, body, payload, chat=False)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: Engine, settings: Settings, metrics: Metrics
) -> Response:
    # The engine renders the conversation with the model's chat template (`bulk.engine.chat`).
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    payload = {"messages": messages, **body.engine_params()}
    check_limits(payload, settings)
    limit = engine.config.max_new_tokens_limit
    if (
        body.max_completion_tokens is not None
        and body.max_tokens is not None
        and not 1 <= body.max_tokens <= limit
    ):
        # The newer name wins, but the older one, given too, must still be valid (the schema says so).
        raise InvalidRequestError("max_tokens", f"must be between 1 and {limit}")
    return await _answer(request, engine, settings, metrics, body, payload, chat=True)


async def _answer(
    request: Request,
    engine: ServingEngine,
    settings: ServerSettings,
    metrics: PrometheusExporter,
    body: CompletionRequest | ChatCompletionRequest,
    payload: dict[str, Any],
    *,
    chat: bool,
) -> Response:
    started = time.perf_counter()
    model = settings.model_name
    api = "openai_chat" if chat else "openai_completions"
    if not body.stream:
        # A client gone before its answer cancels the generation, as a stream's does (below).
        result = await until_disconnected(request, engine.process_request(payload))
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(result), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result["result"]}
        else:
            choice["text"] = result["result"]
        kind = "chat.completion" if chat else "text_completion"
        answer = envelope(kind, _id(chat, result), model, [choice])
        answer["usage"] = usage(result)
        metrics.observe_e2e(api, time.perf_counter() - started)
        return JSONResponse(answer)

    events = engine.stream_request(payload).__aiter__()
    # Wait for the first event before answering: a bad request (a prompt too long for the model, say)
    # fails here and still gets its 422, not a broken stream.
    first = await events.__anext__()
    return StreamingResponse(
        _sse(
            events,
            first,
            chat,
            model,
            body.include_usage,
            lambda: metrics.observe_e2e(api, time.perf_counter() - started),
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(
    events: AsyncIterator[dict[str, Any]],
    first: dict[str, Any],
    chat: bool,
    model: str,
    include_usage: bool,
    on_done: Callable[[], None],
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    stream_id = f"{'chatcmpl' if chat else 'cmpl'}-stream-{time.time_ns():x}"
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any] | str, reason: str | None = None) -> bytes:
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}
        return _event({**envelope(kind, stream_id, model, [choice]), **extra})

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        event: dict[str, Any] | None = first
        final: dict[str, Any] = {}
        while event is not None:
            if event.get("done"):
                final = event
                break
            yield chunk({"content": event["token"]} if chat else event["token"])
            event = await anext(events, None)
        yield chunk({} if chat else "", finish_reason(final))
        if include_usage:
            yield _event({**envelope(kind, stream_id, model, []), "usage": usage(final)})
        on_done()
    except BulError as exc:
        log.error("stream failed: %s", exc)
        yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": 503}})
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # a client gone early cancels the generation
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _id(chat: bool, result: Mapping[str, Any]) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{result.get('request_id', time.time_ns())}"

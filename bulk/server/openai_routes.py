"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (with SSE streaming) and
`/v1/models`. Any OpenAI client works against them (`base_url="http://host:8002/v1"`).

`usage.prompt_tokens_details.cached_tokens` is always filled: the prompt tokens whose KV came from
the cache (all of them when the whole answer came from the response cache). `logprobs` are written
in each route's OpenAI format (`openai_schemas.chat_logprobs`, `completion_logprobs`); `n` choices
are n engine requests sharing the prompt's KV (`_choice_payloads`); a body field the server does not
serve is a 422 naming it (`openai_schemas.NO_OP_VALUES` says what is let through)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bulk.engine.protocol import ServingEngine
from bulk.engine.request import MAX_LOGPROBS
from bulk.engine.result import LOGPROBS_FIELD, TokenLogprobs
from bulk.errors import BulError, InvalidRequestError
from bulk.metrics import PrometheusExporter
from bulk.server.deps import Engine, Metrics, Settings
from bulk.server.disconnect import until_disconnected
from bulk.server.json_input import JSONRoute
from bulk.server.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    envelope,
    finish_reason,
    usage,
)
from bulk.server.openai_tools import ToolPlan, ToolStream, tool_plan
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
    _refuse_unserved(body)
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
    _refuse_unserved(body)
    if body.top_logprobs is not None:
        # Checked here, under the chat route's own name (the engine's field is `logprobs`).
        if not body.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be between 0 and {MAX_LOGPROBS}")
    # The engine renders the conversation with the model's chat template (`bulk.engine.chat`).
    messages = [m.engine_message() for m in body.messages]
    payload = {"messages": messages, **body.engine_params()}
    tools = tool_plan(*body.tool_fields(), body.parallel_tool_calls)
    if tools is not None:
        if tools.forced and "structured_outputs" in payload:
            raise InvalidRequestError(
                "tool_choice", "a forced tool call is structured already: drop response_format"
            )
        payload.update(tools.engine_fields())
    check_limits(payload, settings)
    limit = engine.config.max_new_tokens_limit
    if (
        body.max_completion_tokens is not None
        and body.max_tokens is not None
        and not 1 <= body.max_tokens <= limit
    ):
        # The newer name wins, but the older one, given too, must still be valid (the schema says so).
        raise InvalidRequestError("max_tokens", f"must be between 1 and {limit}")
    return await _answer(request, engine, settings, metrics, body, payload, chat=True, tools=tools)


def _refuse_unserved(body: CompletionRequest | ChatCompletionRequest) -> None:
    name = body.unserved_field()
    if name is not None:
        raise InvalidRequestError(name, "not served by this server (refused rather than ignored)")


async def _answer(
    request: Request,
    engine: ServingEngine,
    settings: ServerSettings,
    metrics: PrometheusExporter,
    body: CompletionRequest | ChatCompletionRequest,
    payload: dict[str, Any],
    *,
    chat: bool,
    tools: ToolPlan | None = None,
) -> Response:
    started = time.perf_counter()
    model = settings.model_name
    api = "openai_chat" if chat else "openai_completions"
    payloads = _choice_payloads(payload, body.choices())
    if not body.stream:
        # A client gone before its answer cancels the generation (every choice), as a stream's does.
        if len(payloads) == 1:
            results = [await until_disconnected(request, engine.process_request(payload))]
        else:
            results = await until_disconnected(request, _all_choices(engine, payloads))
        choices = [_choice(index, result, chat, tools) for index, result in enumerate(results)]
        kind = "chat.completion" if chat else "text_completion"
        answer = envelope(kind, _id(chat, results[0]), model, choices)
        answer["usage"] = usage(results)
        metrics.observe_e2e(api, time.perf_counter() - started)
        return JSONResponse(answer)

    streams = [engine.stream_request(p).__aiter__() for p in payloads]
    # Wait for each choice's first event before answering: a bad request (a prompt too long for the
    # model, say) fails here and still gets its 422, not a broken stream.
    if len(streams) == 1:
        firsts = [await anext(streams[0])]
    else:
        waits = [asyncio.ensure_future(anext(s)) for s in streams]
        try:
            firsts = list(await asyncio.gather(*waits))
        except BaseException:
            # The other choices' waits are still running: stop them (which cancels their
            # generations) before anything else touches their streams.
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]
            raise
    return StreamingResponse(
        _sse(
            streams,
            firsts,
            chat,
            model,
            body.include_usage,
            tools,
            lambda: metrics.observe_e2e(api, time.perf_counter() - started),
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _choice_payloads(payload: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One engine request per choice. They share the prompt's KV through the prefix cache: the
    scheduler holds back a request whose prompt blocks a prefill under way is computing
    (`Scheduler._waits_for`) when computing them again would cost more than waiting. With a seed,
    choice i samples from seed + i, so that seeded choices differ and repeat."""
    if n == 1:
        return [payload]
    seed = payload.get("seed")
    return [payload if seed is None else {**payload, "seed": (seed + i) % 2**63} for i in range(n)]


async def _all_choices(engine: ServingEngine, payloads: list[dict[str, Any]]) -> list[Any]:
    return list(await asyncio.gather(*(engine.process_request(p) for p in payloads)))


def _choice(
    index: int, result: Mapping[str, Any], chat: bool, tools: ToolPlan | None = None
) -> dict[str, Any]:
    # Present only when the request asked for logprobs (`bulk.engine.result.LOGPROBS_FIELD`).
    entries = cast("list[TokenLogprobs] | None", result.get(LOGPROBS_FIELD))
    logprobs = chat_logprobs(entries) if chat else completion_logprobs(entries)
    choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(result), "logprobs": logprobs}
    if chat and tools is not None:
        choice["message"], choice["finish_reason"] = tools.message(result["result"], choice["finish_reason"])
    elif chat:
        choice["message"] = {"role": "assistant", "content": result["result"]}
    else:
        choice["text"] = result["result"]
    return choice


async def _merged(
    streams: list[AsyncIterator[dict[str, Any]]], firsts: list[dict[str, Any]]
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(choice index, event) from every choice's stream, as they come, each ending with its result
    (`"done"`). One choice (the usual case) is read directly, without tasks."""
    if len(streams) == 1:
        event: dict[str, Any] | None = firsts[0]
        while event is not None:
            yield 0, event
            if event.get("done"):
                return
            event = await anext(streams[0], None)
        return
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            await queue.put((index, firsts[index]))
            if not firsts[index].get("done"):
                async for item in streams[index]:
                    await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def _sse(
    streams: list[AsyncIterator[dict[str, Any]]],
    firsts: list[dict[str, Any]],
    chat: bool,
    model: str,
    include_usage: bool,
    tools: ToolPlan | None,
    on_done: Callable[[], None],
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    stream_id = f"{'chatcmpl' if chat else 'cmpl'}-stream-{time.time_ns():x}"
    extra = {"usage": None} if include_usage else {}
    # Logprobs (a request asking for them): each chunk carries those of the tokens it holds; a
    # choice's final one any left (a stop string's tokens, which have no text of their own). Per
    # choice: entries written so far, and the legacy format's `text_offset` of its next token.
    sent = [0] * len(streams)
    offset = [0] * len(streams)

    def chunk(
        index: int, delta: dict[str, Any] | str, reason: str | None = None, entries: Any = None
    ) -> bytes:
        logprobs = None
        if entries is not None:
            sent[index] += len(entries)
            logprobs = chat_logprobs(entries) if chat else completion_logprobs(entries, offset[index])
            offset[index] += sum(len(entry["token"]) for entry in entries)
        if chat:
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta, "finish_reason": reason, "logprobs": logprobs}
        return _event({**envelope(kind, stream_id, model, [choice]), **extra})

    # Tool calls: each choice's deltas shaped by its own `ToolStream` (text held back while it may
    # be a call; calls sent whole at the end, or a named function's arguments as they come).
    tool_streams = [ToolStream(tools) for _ in streams] if chat and tools is not None else None
    try:
        if chat:
            for index in range(len(streams)):
                yield chunk(index, {"role": "assistant", "content": ""})
                for delta in tool_streams[index].start() if tool_streams else ():
                    yield chunk(index, delta)
        finals: list[dict[str, Any]] = [{} for _ in streams]
        async for index, event in _merged(streams, firsts):
            if event.get("done"):
                finals[index] = event
                left = event.get(LOGPROBS_FIELD)
                entries = left[sent[index] :] if left is not None else None
                reason = finish_reason(event)
                if tool_streams:
                    deltas, reason = tool_streams[index].finish(event["result"], reason)
                    for delta in deltas:
                        yield chunk(index, delta)
                yield chunk(index, {} if chat else "", reason, entries)
                continue
            text = event["token"]
            if tool_streams:
                for delta in tool_streams[index].feed(text):
                    yield chunk(index, delta, entries=event.get(LOGPROBS_FIELD))
                continue
            yield chunk(index, {"content": text} if chat else text, entries=event.get(LOGPROBS_FIELD))
        if include_usage:
            yield _event({**envelope(kind, stream_id, model, []), "usage": usage(finals)})
        on_done()
    except BulError as exc:
        log.error("stream failed: %s", exc)
        yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": 503}})
    finally:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]  # a client gone early cancels the generation
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _id(chat: bool, result: Mapping[str, Any]) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{result.get('request_id', time.time_ns())}"

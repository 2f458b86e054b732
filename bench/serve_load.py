"""The load side of `bul bench serve` and `bul bench peers`: OpenAI streaming clients over real
sockets, and the figures.

A request (`Request`) is a raw prompt, sent to `/v1/completions`, or a conversation, sent to
`/v1/chat/completions` as `messages` (each server renders it with its own chat template). Each
client keeps one keep-alive connection and sends requests with `"stream": true` one after another
(a closed loop), recording when the request left, when each chunk with text arrived and how many
tokens it carried, and the usage of the last chunk (`stream_options.include_usage`: prompt, cached
and completion tokens). A workload runs for a fixed window (what is still streaming at its end is
cut off, the server then cancels it, and only tokens that arrived inside the window count), or until
a fixed number of requests is answered (so that two servers are compared on the same requests).

    tokens/s     completion tokens that arrived in the window / the window
    TTFT         request sent -> its first chunk with text (requests that got one)
    ITL          gaps between consecutive chunks of one stream, per token: a chunk that carries k
                 tokens (vLLM merges a stream's tokens into one chunk when its client falls behind;
                 `continuous_usage_stats` says how many) counts as k gaps of 1/k of its gap each
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

Turns = tuple[tuple[str, str], ...]  # (role, content) of each message
MODEL = "bench"  # the model name every request names: each server serves its model under it


@dataclass(frozen=True)
class Request:
    """One request of a workload: a raw `prompt` or a conversation (`messages`), answered greedily
    with at most `max_tokens` tokens."""

    max_tokens: int
    prompt: str | None = None
    messages: Turns = ()
    # Exactly `max_tokens` tokens, whatever the model would answer: vLLM's `ignore_eos` and
    # `min_tokens`, which ours accepts under the same names; both servers then decode as much.
    forced: bool = False

    @property
    def chat(self) -> bool:
        return bool(self.messages)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, model: str = MODEL) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        if self.chat:
            body["messages"] = [{"role": role, "content": content} for role, content in self.messages]
        else:
            body["prompt"] = self.prompt
        body.update(
            {
                "max_tokens": self.max_tokens,
                "temperature": 0,  # greedy on every side (OpenAI's default is 1)
                "stream": True,
                # Usage on the last chunk; vLLM also puts it on every chunk (its extension, which
                # ours ignores): how many tokens each chunk carried.
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
        )
        if self.forced:
            body.update({"ignore_eos": True, "min_tokens": self.max_tokens})
        return body


def as_request(item: Request | tuple[str, int]) -> Request:
    """A `Request` from a request or a (raw prompt, max_tokens) pair."""
    return item if isinstance(item, Request) else Request(max_tokens=item[1], prompt=item[0])


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    label: str
    sent: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each chunk with text
    counts: list[int] = field(default_factory=list)  # tokens in each of those chunks
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    max_tokens: int | None = None
    forced: bool = False
    finished: bool = False

    @property
    def ttft(self) -> float | None:
        return self.tokens[0] - self.sent if self.tokens else None

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Per-token gaps between consecutive chunks, the later one arriving in [start, end)."""
        counts = self.counts if len(self.counts) == len(self.tokens) else [1] * len(self.tokens)
        out: list[float] = []
        for i in range(1, len(self.tokens)):
            if start <= self.tokens[i] < end:
                k = max(counts[i], 1)
                out.extend([(self.tokens[i] - self.tokens[i - 1]) / k] * k)
        return out

    def arrived(self, start: float = 0.0, end: float = float("inf")) -> int:
        """Tokens that arrived in [start, end): the usage's count for a stream that finished wholly
        inside it, the chunks' counts otherwise (a stream cut off has no usage)."""
        if not self.tokens:
            return 0
        inside = start <= self.tokens[0] and self.tokens[-1] < end
        if self.finished and inside and self.completion_tokens is not None:
            return self.completion_tokens
        counts = self.counts if len(self.counts) == len(self.tokens) else [1] * len(self.tokens)
        return sum(k for t, k in zip(self.tokens, counts, strict=True) if start <= t < end)


def chunk_text(chunk: Mapping[str, Any], chat: bool) -> str:
    """The text a streamed chunk carries (a chat delta's content, a completion's text)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def stream_request(
    http: httpx.AsyncClient, url: str, request: Request, label: str, out: list[Stream]
) -> Stream:
    """Send one streaming request; record it in `out` from the moment it is sent."""
    record = Stream(label, time.perf_counter(), max_tokens=request.max_tokens, forced=request.forced)
    out.append(record)
    seen = 0  # completion tokens counted so far, from the chunks' running usage where given
    async with http.stream("POST", f"{url}{request.path}", json=request.body()) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {(await answer.aread())[:300]!r}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            arrived = time.perf_counter()
            chunk = json.loads(line[6:])
            usage = chunk.get("usage")
            if chunk_text(chunk, request.chat):
                record.tokens.append(arrived)
                total = usage.get("completion_tokens") if usage else None
                record.counts.append(max(total - seen, 1) if total is not None else 1)
                seen = total if total is not None else seen + 1
            if usage and not chunk.get("choices"):  # the last chunk: the request's usage
                record.prompt_tokens = usage["prompt_tokens"]
                record.completion_tokens = usage.get("completion_tokens")
                record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    record.finished = True
    return record


async def stream_completion(
    http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, label: str, out: list[Stream]
) -> Stream:
    """Send one streaming raw completion (`/v1/completions`)."""
    return await stream_request(http, url, Request(max_tokens=max_tokens, prompt=prompt), label, out)


async def closed_loop(
    url: str,
    clients: int,
    next_prompt: Callable[[int, int], Request | tuple[str, int]],
    seconds: float | None = None,
    requests: int | None = None,
    warmup: float = 0.0,
) -> tuple[list[Stream], float, float]:
    """`clients` clients, each sending `next_prompt(client, n)` (a `Request`, or a (raw prompt,
    max_tokens) pair) one after another, for `warmup` + `seconds` (what still streams then is cut
    off) or until `requests` requests in all have been answered; returns every stream and the
    measured window (start, end), which leaves out the `warmup` (clients that all start at once
    first queue up together)."""
    streams: list[Stream] = []
    start = time.perf_counter() + warmup
    end = start + seconds if seconds is not None else float("inf")
    tickets = iter(range(requests)) if requests is not None else None

    async def client(index: int) -> None:
        # Clients join one after another over the warmup, as users do, rather than all at once.
        await asyncio.sleep(warmup * index / clients)
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as http:
            n = 0
            while time.perf_counter() < end and (tickets is None or next(tickets, None) is not None):
                request = as_request(next_prompt(index, n))
                await stream_request(http, url, request, f"c{index}", streams)
                n += 1

    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    await asyncio.wait(tasks, timeout=None if seconds is None else warmup + seconds)
    for task in tasks:
        task.cancel()  # streams still running are cut off: the server cancels them
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if seconds is None:
        # Just past the last token, so that the window [start, end) holds it.
        end = math.nextafter(max((s.tokens[-1] for s in streams if s.tokens), default=start), math.inf)
    return streams, start, end


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def censored_percentile(values: list[tuple[float, bool]], q: float) -> tuple[float | None, bool]:
    """The q-th of (value, is a lower bound) pairs, and whether it is itself only a lower bound."""
    if not values:
        return None, False
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(streams: list[Stream], start: float, end: float) -> dict[str, Any]:
    """tokens/s and ITL over the window; TTFT over every request of the run, a request still
    waiting for its first token at the end counting as its wait so far (so a percentile can be a
    lower bound: `ttft_*_censored`); token hit rate over the completed requests; `forced_short`:
    completed requests told to answer exactly `max_tokens` tokens that answered fewer (a server
    that ignored `ignore_eos`: its tokens/s is then not comparable)."""
    tokens = sum(s.arrived(start, end) for s in streams)
    chunks = sum(1 for s in streams for t in s.tokens if start <= t < end)
    last = max((t for s in streams for t in s.tokens), default=end)
    waits = [(s.ttft, False) if s.ttft is not None else (max(end, last) - s.sent, True) for s in streams]
    gaps = [g for s in streams for g in s.gaps(start, end)]
    completed = [s for s in streams if s.finished and s.prompt_tokens]
    prompt = sum(s.prompt_tokens or 0 for s in completed)
    cached = sum(s.cached_tokens or 0 for s in completed)
    # A stream without usage (llama-cpp-python's) is judged by the tokens its chunks carried.
    forced_short = sum(
        1
        for s in streams
        if s.finished
        and s.forced
        and (s.completion_tokens if s.completion_tokens is not None else s.arrived()) < (s.max_tokens or 0)
    )

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    p50, p95 = censored_percentile(waits, 0.50), censored_percentile(waits, 0.95)
    return {
        "tokens_per_s": tokens / (end - start) if end > start else 0.0,
        "tokens": tokens,
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "requests_sent": len(streams),
        "requests_completed": len(completed),
        "prompt_tokens_mean": prompt / len(completed) if completed else None,
        "ttft_p50_ms": ms(p50[0]),
        "ttft_p50_censored": p50[1],
        "ttft_p95_ms": ms(p95[0]),
        "ttft_p95_censored": p95[1],
        "itl_p50_ms": ms(percentile(gaps, 0.50)),
        "itl_p99_ms": ms(percentile(gaps, 0.99)),
        "token_hit_rate": cached / prompt if prompt else None,
        "forced_short": forced_short,
    }


def prefill_rate(samples: Sequence[tuple[int | None, int | None, float | None]]) -> float | None:
    """The median prompt tokens/s of cold prompts: (prompt tokens - cached) / TTFT, per request
    (prompt tokens, cached tokens, TTFT in seconds)."""
    rates = [(p - (c or 0)) / t for p, c, t in samples if p and t]
    return statistics.median(rates) if rates else None


# ---- the server's own counters ----------------------------------------------------------------------


def batch_counters(stats: Mapping[str, Any]) -> tuple[int, int]:
    """(decode steps, decode rows) from our server's `/api/stats`: the rows summed over the steps."""
    batch = stats["batch"]
    return int(batch["decode_steps"]), int(batch["decode_rows"])


def mean_batch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Our mean decode batch over a workload, from `/api/stats` read before and after it: the decode
    rows it added / the decode steps it added (None when it ran no decode step)."""
    steps0, rows0 = batch_counters(before)
    steps1, rows1 = batch_counters(after)
    steps, rows = steps1 - steps0, rows1 - rows0
    return {"decode_steps": steps, "decode_rows": rows, "mean_batch": rows / steps if steps > 0 else None}


def server_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/api/stats", timeout=30).json()


def wait_server_idle(url: str, timeout: float = 300) -> None:
    """Until our server runs and queues nothing (cut-off streams are cancelled at the next step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server_stats(url)
        if stats["running"] == 0 and stats["queue_depth"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not become idle")

"""The load side of `bul bench serve`: OpenAI streaming clients over real sockets, and the figures.

Each client keeps one keep-alive connection and sends `/v1/completions` requests with
`"stream": true` one after another (a closed loop), recording when the request left, when each
token's chunk arrived and the usage of the last chunk (`stream_options.include_usage`: prompt and
cached tokens). A workload runs for a fixed window (what is still streaming at its end is cut off, the
server then cancels it, and only tokens that arrived inside the window count), or until a fixed
number of requests is answered (so that two servers are compared on the same requests).

    tokens/s     completion tokens that arrived in the window / the window
    TTFT         request sent -> its first token's chunk (requests that got one)
    ITL          gaps between consecutive chunks of one stream
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    label: str
    sent: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each chunk with text
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finished: bool = False

    @property
    def ttft(self) -> float | None:
        return self.tokens[0] - self.sent if self.tokens else None

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Gaps between consecutive tokens, the later one arriving in [start, end)."""
        return [b - a for a, b in itertools.pairwise(self.tokens) if start <= b < end]


async def stream_completion(
    http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, label: str, out: list[Stream]
) -> Stream:
    """Send one streaming completion; record it in `out` from the moment it is sent."""
    record = Stream(label, time.perf_counter())
    out.append(record)
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,  # greedy, as the generate_batch baseline (OpenAI's default is 1)
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", f"{url}/v1/completions", json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {(await answer.aread())[:200]!r}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            arrived = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                record.tokens.append(arrived)
            if chunk.get("usage"):
                usage = chunk["usage"]
                record.prompt_tokens = usage["prompt_tokens"]
                record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    record.finished = True
    return record


async def closed_loop(
    url: str,
    clients: int,
    next_prompt: Callable[[int, int], tuple[str, int]],
    seconds: float | None = None,
    requests: int | None = None,
    warmup: float = 0.0,
) -> tuple[list[Stream], float, float]:
    """`clients` clients, each sending `next_prompt(client, n)` -> (prompt, max_tokens) requests one
    after another, for `warmup` + `seconds` (what still streams then is cut off) or until `requests`
    requests in all have been answered; returns every stream and the measured window (start, end),
    which leaves out the `warmup` (clients that all start at once first queue up together)."""
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
                prompt, max_tokens = next_prompt(index, n)
                await stream_completion(http, url, prompt, max_tokens, f"c{index}", streams)
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
        end = max((s.tokens[-1] for s in streams if s.tokens), default=start)
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
    lower bound: `ttft_*_censored`); token hit rate over the completed requests."""
    tokens = sum(1 for s in streams for t in s.tokens if start <= t < end)
    last = max((t for s in streams for t in s.tokens), default=end)
    waits = [(s.ttft, False) if s.ttft is not None else (max(end, last) - s.sent, True) for s in streams]
    gaps = [g for s in streams for g in s.gaps(start, end)]
    completed = [s for s in streams if s.finished and s.prompt_tokens]
    prompt = sum(s.prompt_tokens or 0 for s in completed)
    cached = sum(s.cached_tokens or 0 for s in completed)

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    p50, p95 = censored_percentile(waits, 0.50), censored_percentile(waits, 0.95)
    return {
        "tokens_per_s": tokens / (end - start),
        "tokens": tokens,
        "requests_sent": len(streams),
        "requests_completed": len(completed),
        "ttft_p50_ms": ms(p50[0]),
        "ttft_p50_censored": p50[1],
        "ttft_p95_ms": ms(p95[0]),
        "ttft_p95_censored": p95[1],
        "itl_p50_ms": ms(percentile(gaps, 0.50)),
        "itl_p99_ms": ms(percentile(gaps, 0.99)),
        "token_hit_rate": cached / prompt if prompt else None,
    }

"""The headline of `bul bench serve`: the real model under chat traffic, from 1 to 32 clients.

One `bul serve` process as configured by default (continuous batching) on the default real model
(`auto`: SmolLM2-135M-Instruct where its wheel is installed), its dtype `auto`, driven through
`/v1/chat/completions` (`messages`, each rendered by the model's chat template) by the clients of
`bench.serve_load`, with the requests of `bench.chat_traffic`:

  short      distinct ~200-token questions, answers of at most 32 tokens, N clients (1, 4, 16, 32)
             for a fixed window each
  long       the same questions, answers forced (`ignore_eos`, `min_tokens`) to 128-384 tokens, 256
             on average: clients that all finished together would all arrive together again
  shared     a few ~1,000-token system prompts, many questions after them, 16 clients
  chat       multi-turn chats, one per client, 16 clients: each turn sends the chat so far
  cold       a few fresh ~1,000-token prompts, one token of answer (one client): prompt tokens/s,
             set beside this machine's GEMM FLOP/s (`bench.gemm`)

For each: TTFT p50/p95, ITL p50/p99, completion tokens/s, and the mean decode batch over the
workload (`/api/stats`' decode rows / decode steps, read before and after it). The target: 16
clients' tokens/s at least 4x one client's, on short and on long answers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Mapping
from typing import Any

from bench import chat_traffic, gemm
from bench.common import ratio
from bench.http import serve_env, start_server, stop, wait_ready
from bench.serve_load import (
    Request,
    Stream,
    closed_loop,
    figures,
    mean_batch,
    prefill_rate,
    server_stats,
    wait_server_idle,
)
from bulk import named_models

log = logging.getLogger("bench.serve")

TARGET_SCALING = 4.0  # 16 clients / 1 client, tokens/s, chat traffic on the real model


def chat_env(options: Mapping[str, Any]) -> dict[str, str]:
    return serve_env(options["chat_model"], options["chat_dtype"], options.get("threads"))


def _measure(url: str, name: str, run: Any) -> tuple[dict[str, Any], list[Stream]]:
    """One workload (`run`: a coroutine function driving it): its figures and our mean decode batch
    over it (the stats read once the server is idle again, so that cut-off streams are retired)."""
    before = server_stats(url)
    streams, start, end = asyncio.run(run())
    out = figures(streams, start, end)
    wait_server_idle(url)
    out.update(mean_batch(before, server_stats(url)))
    log.info("chat traffic, %s: %.1f tokens/s, mean batch %s", name, out["tokens_per_s"], out["mean_batch"])
    return out, streams


def run_chat(options: Mapping[str, Any], text: str) -> dict[str, Any]:
    env = chat_env(options)
    process, port = start_server("bulk.server.app:create_app", env)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(11)
    result: dict[str, Any] = {"env": env}
    try:
        wait_ready(process, port, "/health", timeout=600)
        served = server_stats(url)["config"]
        # What `auto` resolved to: the model (resolved here as the server does, on the same machine),
        # its dtype and weight quantization (the server's own answer).
        result["resolved"] = {
            "model": named_models.resolve_model_name(options["chat_model"]),
            **{k: served.get(k) for k in ("dtype", "weight_quantization")},
        }
        # Warm: first-call costs, one short and one longer prompt.
        warm = iter([Request(4, messages=(("user", text[:200]),)), chat_traffic.distinct_request(text, 0, 4)])
        asyncio.run(closed_loop(url, 1, lambda c, n: next(warm), requests=2))
        counter = itertools.count(1)
        q_tokens = options["question_tokens"]
        for kind in ("short", "long"):
            result[kind] = {}
            for clients in options["chat_concurrency"]:

                def next_request(client: int, n: int, kind: str = kind) -> Request:
                    index = next(counter)
                    if kind == "short":
                        return chat_traffic.distinct_request(text, index, options["short_tokens"], q_tokens)
                    tokens = rng.randint(options["long_tokens"] // 2, options["long_tokens"] * 3 // 2)
                    return chat_traffic.distinct_request(text, index, tokens, q_tokens, forced=True)

                def run(c: int = clients, f: Any = next_request) -> Any:
                    return closed_loop(
                        url, c, f, seconds=options["chat_seconds"], warmup=options["chat_warmup"]
                    )

                figures_, _ = _measure(url, f"{kind}, {clients} clients", run)
                result[kind][str(clients)] = figures_
        systems = chat_traffic.system_prompts(
            text, options["chat_system_prompts"], options["chat_system_tokens"]
        )
        shared_index = itertools.count()

        def shared(client: int, n: int) -> Request:
            return chat_traffic.shared_request(systems, next(shared_index), options["short_tokens"])

        clients = options["chat_clients"]
        result["shared"], _ = _measure(
            url,
            "shared system prompts",
            lambda: closed_loop(url, clients, shared, requests=options["chat_shared_requests"]),
        )
        result["shared"]["clients"] = clients

        def turn(client: int, n: int) -> Request:
            return chat_traffic.chat_turn(client, n, options["short_tokens"])

        result["chat"], _ = _measure(
            url,
            "multi-turn chats",
            lambda: closed_loop(url, clients, turn, requests=clients * options["chat_turns"]),
        )
        result["chat"]["clients"] = clients
        cold = iter(
            [
                chat_traffic.cold_request(text, i, options["cold_tokens"])
                for i in range(options["cold_prompts"])
            ]
        )
        result["cold"], streams = _measure(
            url,
            "cold prompts",
            lambda: closed_loop(url, 1, lambda c, n: next(cold), requests=options["cold_prompts"]),
        )
        result["cold"]["prompt_tokens_per_s"] = prefill_rate(
            [(s.prompt_tokens, s.cached_tokens, s.ttft) for s in streams]
        )
        stats = server_stats(url)
        result["server_stats"] = {
            "requests": stats["requests"],
            "errors": stats["errors"],
            "batch": stats["batch"],
        }
    finally:
        stop(process)
    counts = gemm.named_model_parameters(result.get("resolved", {}).get("model") or options["chat_model"])
    if counts is not None:
        # After the server has stopped: the roof at the threads the server had, on an idle machine.
        roof = gemm.measure_in_child(int(options.get("threads") or 1))
        result["gemm"] = roof
        result["roof"] = {
            "prompt_tokens_per_s": result["cold"]["prompt_tokens_per_s"],
            **gemm.roof(result["cold"]["prompt_tokens_per_s"], counts[0], roof, counts[1]),
        }
    return result


def chat_verdicts(chat: Mapping[str, Any]) -> dict[str, Any]:
    """16 clients / 1 client tokens/s on short and on long answers (a quick run, which stops below
    16, compares its largest level)."""
    out = {}
    for kind in ("short", "long"):
        tps = {k: v["tokens_per_s"] for k, v in chat.get(kind, {}).items()}
        if not tps:
            continue
        low, high = min(tps, key=int), "16" if "16" in tps else max(tps, key=int)
        value = ratio(tps[high], tps[low])
        forced_short = sum(v.get("forced_short", 0) for v in chat[kind].values())
        out[f"chat_{kind}_scaling_16_over_1"] = {
            "value": value,
            "target": TARGET_SCALING,
            "at_least": True,
            "met": value is not None and value >= TARGET_SCALING and not forced_short,
            "levels": [low, high],
            "forced_short": forced_short,
        }
    return out

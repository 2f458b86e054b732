"""Smoke test of `bul bench policies`: the quick settings run end to end and write complete results.

No timing assertions: the machine running the tests is noisy."""

import json

# `bench` is a directory of the repository, not of the installed package: pytest's `pythonpath`
# setting puts the repository root on sys.path.
from bench import policies, policies_report
from bench.traces import all_traces


def test_quick_run_writes_every_trace_and_policy(tmp_path, capsys):
    assert policies.main(["--quick", "--out", str(tmp_path)]) == 0

    latest = tmp_path / "policies-latest.json"
    assert latest.is_file()
    stamped = [p for p in tmp_path.glob("policies-*.json") if p.name != latest.name]
    assert len(stamped) == 1
    data = json.loads(latest.read_text())
    assert data == json.loads(stamped[0].read_text())
    for png in (stamped[0].with_suffix(".png"), tmp_path / "policies-latest.png"):
        assert png.is_file() and png.stat().st_size > 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    names = [t.name for t in all_traces()]
    assert list(data["traces"]) == names
    assert data["settings"]["quick"] is True
    for name, trace in data["traces"].items():
        n_caps = len(trace["capacities"])
        assert n_caps == 1, name
        for policy in (*policies_report.POLICIES, "lcs-lru", "lcs-lfu"):
            ratios = trace["hit_ratio"][policy]
            assert len(ratios) == n_caps, (name, policy)
            # The quick capacities (>= 100) suit every libCacheSim policy: no cell is skipped.
            assert all(r is not None and 0.0 <= r <= 1.0 for r in ratios), (name, policy, ratios)
            assert all(v is not None and v > 0 for v in trace["ns_per_access"][policy]), (name, policy)
        if not trace["kv_prefix"]:
            # Bélády is optimal among demand-paging policies with unit sizes, which all of these are.
            for i in range(n_caps):
                best = trace["hit_ratio"]["belady"][i]
                for policy, ratios in trace["hit_ratio"].items():
                    assert ratios[i] <= best + 1e-12, (name, policy, ratios[i], best)
        # Our LRU and LFU replay the same flat keys as libCacheSim's, hit for hit.
        flat = trace["flat_hit_ratio"]
        for ours in ("lru", "lfu"):
            pairs = zip(flat[ours], flat[f"lcs-{ours}"], strict=True)
            assert all(abs(a - b) < 1e-9 for a, b in pairs), (name, ours)

    summary = data["summary"]
    assert set(summary["per_trace"]) == set(names)
    assert summary["cost_ratio_adaptive_over_lru"] > 0
    assert summary["mean_hit_ratio"]["cells"] == len(names)
    check = summary["lru_lfu_match_libcachesim"]
    assert check["agree"] == check["checked"] == 2 * len(names)

    out = capsys.readouterr().out
    assert "Summary" in out
    assert "ADAPTIVE - best ref (pp)" in out
    assert "ADAPTIVE - Belady (pp)" in out
    assert "ADAPTIVE / LRU" in out


def test_prefix_score_counts_blocks_up_to_the_first_miss():
    requests = [(1, 2, 3), (4, 5), (6,)]
    # Request 1: hit, miss, hit -> 1 block; request 2: hit, hit -> 2; request 3: miss -> 0.
    hits = [True, False, True, True, True, False]
    assert policies.prefix_score(requests, hits) == 3 / 6


def test_trace_selection_and_reduction(tmp_path):
    assert policies.main(["--quick", "--traces", "loop", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "policies-latest.json").read_text())
    assert list(data["traces"]) == ["loop"]
    assert data["traces"]["loop"]["accesses"] == 5_000


def test_seed_offset_draws_fresh_traces_of_the_same_shapes(tmp_path):
    base, shifted = all_traces(), all_traces(seed_offset=1)
    assert [t.name for t in base] == [t.name for t in shifted]
    for a, b in zip(base, shifted, strict=True):
        assert a.capacities == b.capacities and a.keys != b.keys, a.name
        if a.requests is None:  # KV-prefix sessions draw their lengths: only flat traces keep theirs
            assert len(a.keys) == len(b.keys), a.name
    assert policies.main(["--quick", "--traces", "loop", "--seed-offset", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "policies-latest.json").read_text())
    assert data["settings"]["seed_offset"] == 1

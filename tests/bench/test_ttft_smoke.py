"""Smoke test of `bul bench ttft`: the quick settings run end to end and write complete results.

No timing assertions: the machine running the tests is noisy."""

import json

import pytest

# `bench` is a directory of the repository, not of the installed package: pytest's `pythonpath`
# setting puts the repository root on sys.path.
from bench import ttft, ttft_report


def test_quick_run_writes_every_scenario(tmp_path, capsys):
    assert ttft.main(["--quick", "--dtype", "float32", "--out", str(tmp_path)]) == 0

    latest = tmp_path / "ttft-latest.json"
    assert latest.is_file()
    stamped = [p for p in tmp_path.glob("ttft-*.json") if p.name != latest.name]
    assert len(stamped) == 1
    data = json.loads(latest.read_text())
    assert data == json.loads(stamped[0].read_text())

    assert data["settings"]["model"] == "demo" and data["settings"]["dtype"] == "float32"
    assert data["settings"]["threads"] >= 1
    assert data["machine"]["torch"]
    lengths = data["settings"]["lengths"]
    assert lengths == [64, 128]
    assert set(data["results"]) == {str(n) for n in lengths}
    for n in lengths:
        result = data["results"][str(n)]
        for scenario in ttft.SCENARIOS:
            value = result["median_ms"][scenario]
            assert isinstance(value, float) and value > 0, (n, scenario, value)
        for scenario, runs in result["runs_ms"].items():
            assert len(runs) == data["settings"]["runs"], (n, scenario)
            assert all(ms > 0 for ms in runs), (n, scenario, runs)
        assert result["cached_tokens"]["cold"] == 0
        assert result["cached_tokens"]["full_hit"] > 0
        assert result["cached_tokens"]["full_hit"] >= n - data["settings"]["block_size"]
        assert 0 < result["cached_tokens"]["half_hit"] <= n // 2
        # The question reuses exactly the full blocks of its prefix, and its limit copies as many.
        block_size = data["settings"]["block_size"]
        question = data["settings"]["question_tokens"]
        assert question == ttft_report.QUESTION_TOKENS == 32
        reused = (n - question) // block_size * block_size
        assert reused > 0
        assert result["cached_tokens"]["question"] == reused
        assert result["cached_tokens"]["limit_question_copy"] == reused
        medians = result["median_ms"]
        assert medians["limit_question"] == pytest.approx(
            medians["limit_question_copy"] + medians["limit_question_forward"]
        )
        assert result["ratios"]["question_over_limit"] == pytest.approx(
            medians["question"] / medians["limit_question"]
        )
        for value in result["ratios"].values():
            assert value is not None
    assert {t["target"] for t in data["targets"]} == {t[0] for t in ttft_report.TARGETS}
    # The four original targets, unchanged, and the question's.
    targets = {t["target"]: t for t in data["targets"]}
    assert set(targets) == {
        "full_hit_speedup",
        "full_hit_vs_limit",
        "miss_overhead",
        "shared_prefix",
        "question_vs_limit",
    }
    row = targets["question_vs_limit"]
    assert (row["op"], row["threshold"], row["length"]) == ("<=", 1.5, lengths[-1])
    assert row["value"] == data["results"][str(lengths[-1])]["ratios"]["question_over_limit"]

    out = capsys.readouterr().out
    assert "full-prefix hit" in out
    assert "32-token question" in out
    assert "question / its limit (x)" in out
    assert "targets met at 128 tokens: " in out and " of 5" in out

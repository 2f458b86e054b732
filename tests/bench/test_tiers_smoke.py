"""Smoke test of `bul bench tiers`: the quick settings run end to end against the real Redis and
PostgreSQL and write complete results. No timing assertions: the machine is noisy."""

import json

from bench import tiers


def test_quick_run_reports_every_tier(tmp_path, capsys):
    assert tiers.main(["--quick", "--runs", "1", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiers-latest.json").read_text())
    assert data["settings"]["dtype"] == "float32"
    assert data["skipped"] == {}
    assert set(data["speedup_vs_recompute"]) == {"memory", "disk", "redis", "postgres"}
    assert all(v > 0 for v in data["ttft_ms"].values())
    reads = data["redis_reads"]
    assert reads["bytes"] > 0 and reads["share_of_raw_get"] > 0
    sizes = data["bytes_per_token"]
    assert sizes["none"]["ratio_vs_model_dtype"] == 1.0
    assert sizes["int8"]["ratio_vs_model_dtype"] >= 1.9 and sizes["int4"]["ratio_vs_model_dtype"] >= 3.5
    out = capsys.readouterr().out
    assert "prefix found in" in out and "Bytes per token" in out

"""Smoke test of `bul bench http`: the quick settings start both servers (real uvicorn processes),
load them over real sockets and write complete results.

No timing assertions: the machine running the tests is noisy."""

import json

# `bench` is a directory of the repository, not of the installed package: pytest's `pythonpath`
# setting puts the repository root on sys.path.
from bench import http


def test_quick_run_writes_both_servers_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BUL_DTYPE", "float32")  # the server's dtype, pinned (it reads BUL_* settings)
    assert http.main(["--quick", "--out", str(tmp_path)]) == 0

    latest = tmp_path / "http-latest.json"
    assert latest.is_file()
    stamped = [p for p in tmp_path.glob("http-*.json") if p.name != latest.name]
    assert len(stamped) == 1
    data = json.loads(latest.read_text())
    assert data == json.loads(stamped[0].read_text())

    assert data["benchmark"] == "http" and data["model"] == "demo"
    assert data["options"] == http.QUICK
    assert data["target"] == http.TARGET
    assert len(data["rounds"]) == http.QUICK["rounds"]
    for round_ in data["rounds"]:
        assert set(round_) == {"bare", "cached"}
        for figures in round_.values():
            assert set(figures) == {"requests", "rps", "p50_ms", "p99_ms", "errors"}
            assert figures["requests"] > 0 and figures["rps"] > 0 and figures["errors"] == 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    ratio = data["throughput_ratio"]
    assert isinstance(ratio, float) and ratio > 0
    assert data["meets_target"] == (ratio >= http.TARGET)
    # Every measured /api/query answer came from the response cache (plus the one check request).
    cached_requests = sum(r["cached"]["requests"] for r in data["rounds"])
    assert data["response_cache_hits"] >= cached_requests

    out = capsys.readouterr().out
    assert "bare FastAPI constant" in out and "/api/query (response cache)" in out
    assert "cached / bare throughput" in out

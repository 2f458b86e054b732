"""Smoke test of `bul bench decode`: the quick settings measure decode steps on the demo model in two
processes of their own (native code on, then off), and the table and results file hold every
(rows, context) of both. No timing assertions: the machine running the tests is noisy."""

import json

from bench import decode


def test_quick_run_measures_every_shape_both_ways(tmp_path, capsys):
    assert decode.main(["--quick", "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "decode-latest.json").read_text())
    runs = data["runs"]
    keys = {f"{r}x{c}" for r in decode.QUICK["rows"] for c in decode.QUICK["context"]}
    for name in ("native", "python"):
        assert set(runs[name]["steps_ms"]) == keys
        assert all(ms > 0 for ms in runs[name]["steps_ms"].values())
    assert runs["native"]["native_attention"] and not runs["python"]["native_attention"]
    table = capsys.readouterr().out
    assert "python/native" in table and table.count("\n") >= len(keys) + 3

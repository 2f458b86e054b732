"""Smoke test of `bul bench dtype`: the quick settings (demo model) measure both dtypes side by side
and write complete results. No timing assertions: the machine is noisy."""

import json

from bench import dtype


def test_quick_run_measures_both_dtypes(tmp_path, capsys):
    assert dtype.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dtype-latest.json").read_text())
    assert isinstance(data["settings"]["bf16_instructions"], bool)
    speed = data["speed"]
    keys = {"ttft_64", "decode_1", f"decode_{dtype.QUICK['batch']}"}
    for name in dtype.DTYPES:
        assert set(speed["medians"][name]) == keys
        assert all(v > 0 for v in speed["medians"][name].values())
    assert set(speed["bf16_over_fp32"]) == keys and all(v > 0 for v in speed["bf16_over_fp32"].values())
    quality = data["quality"]
    assert set(quality["perplexity"]) == set(dtype.DTYPES)
    assert quality["perplexity"]["float32"]["change_pct"] == 0.0
    # bfloat16 weights and KV move the scores, a little.
    assert quality["perplexity"]["bfloat16"]["nll"] != quality["perplexity"]["float32"]["nll"]
    assert abs(quality["perplexity"]["bfloat16"]["change_pct"]) < 5
    assert 0 < quality["agreement"]["agreement"] <= 1
    # In float32, answers over reused blocks are those computed from nothing (the README's claim).
    assert quality["reuse_agreement"]["float32"]["agreement"] == 1.0
    out = capsys.readouterr().out
    assert "bf16 / fp32" in out and "perplexity" in out

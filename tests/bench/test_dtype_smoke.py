"""Smoke test of `bul bench dtype`: the quick settings (demo model) measure every variant (float32,
bfloat16, bfloat16 with int4 weights) side by side and write complete results. No timing assertions:
the machine is noisy."""

import json

from bench import dtype


def test_quick_run_measures_every_variant(tmp_path, capsys):
    assert dtype.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dtype-latest.json").read_text())
    assert isinstance(data["settings"]["bf16_instructions"], bool)
    speed = data["speed"]
    keys = {"ttft_64", "decode_1", f"decode_{dtype.QUICK['batch']}"}
    others = set(dtype.VARIANTS) - {dtype.BASE}
    for name in dtype.VARIANTS:
        assert set(speed["medians"][name]) == keys
        assert all(v > 0 for v in speed["medians"][name].values())
    assert set(speed["over_float32"]) == others
    assert all(set(r) == keys and all(v > 0 for v in r.values()) for r in speed["over_float32"].values())
    quality = data["quality"]
    assert set(quality["perplexity"]) == set(dtype.VARIANTS)
    assert quality["perplexity"]["float32"]["change_pct"] == 0.0
    # bfloat16 weights and KV move the scores, a little; int4 weights more, still boundedly.
    for name in others:
        assert quality["perplexity"][name]["nll"] != quality["perplexity"]["float32"]["nll"]
        assert abs(quality["perplexity"][name]["change_pct"]) < 5
        assert 0 < quality["agreement"][name]["agreement"] <= 1
    # In float32, answers over reused blocks are those computed from nothing (the README's claim).
    assert quality["reuse_agreement"]["float32"]["agreement"] == 1.0
    out = capsys.readouterr().out
    assert "bfloat16 / fp32" in out and "bf16+int4 / fp32" in out and "perplexity" in out

"""Smoke test of `bul bench quality` (tiny settings on the demo model) and a check of its harness:
with blocks stored as they are, reading a window chunk by chunk over the prefix cache scores the
text exactly as one plain forward does. No timing assertions."""

import json

import pytest

from bench import quality


def test_quick_run_writes_every_mode(tmp_path, capsys):
    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality-latest.json").read_text())
    assert data["settings"]["model"] == "demo" and data["settings"]["dtype"] == "float32"
    assert data["settings"]["corpus"] == list(quality.CORPUS)
    ppl = data["perplexity"]
    assert set(ppl) == {"plain", *quality.MODES}
    scored = {figures["tokens"] for figures in ppl.values()}
    assert scored == {quality.QUICK["windows"] * (quality.QUICK["window"] - quality.QUICK["chunk"] - 1)}
    # Blocks stored as they are change nothing; the harness reads them back exactly.
    assert ppl["none"]["perplexity"] == pytest.approx(ppl["plain"]["perplexity"], rel=1e-5)
    assert ppl["none"]["change_pct"] == 0.0
    # Quantized blocks change the scores (int4 more than int8), if only a little.
    assert ppl["int8"]["nll"] != ppl["none"]["nll"]
    assert abs(ppl["int4"]["change_pct"]) >= abs(ppl["int8"]["change_pct"])
    agree = data["agreement"]
    assert (
        agree["none"]["agreement"] == 1.0 and agree["none"]["identical_sequences"] == quality.QUICK["prompts"]
    )
    assert agree["int8"]["positions"] >= quality.QUICK["prompts"] * quality.QUICK["new_tokens"]
    out = capsys.readouterr().out
    assert "Perplexity" in out and "Greedy agreement" in out


def test_the_text_is_over_20000_tokens_of_the_real_model(real_model):
    """The corpus: the four FSF licence texts, over 20,000 SmolLM2 tokens (the issue's minimum)."""
    text = quality.load_corpus()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "GNU Free Documentation License" in text
    assert len(real_model.tokenizer.encode(text)) >= 20_000


def test_agreement_counts_positions_and_first_differences():
    result = quality.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6, 7]])
    assert result["positions"] == 7 and result["same"] == 5
    assert result["before_first_difference"] == pytest.approx(4 / 7)
    assert result["identical_sequences"] == 0


def test_windows_do_not_overlap_and_drop_the_tail():
    wins = quality.windows(list(range(10)), 4)
    assert wins == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert quality.windows(list(range(10)), 4, limit=1) == [[0, 1, 2, 3]]

"""The parts of `bul bench models`: each family's builder gives the stated layout at a tiny shape, the
table renders from a made-up result, and both parts measure two tiny families in this process
(prefix reuse reported). No timing assertions: the machine running the tests is noisy."""

import pytest
import torch

from bench import models

TINY = models.SHAPES["tiny"]


@pytest.mark.parametrize("family", models.FAMILIES)
def test_each_family_is_built_at_the_shape_asked(family):
    model = models.build_model(family, "tiny", torch.bfloat16)
    cfg = model.config
    assert model.dtype == torch.bfloat16 and not model.training
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(cfg, key) == TINY[key], key
    assert cfg.vocab_size == TINY["vocab_size"] and cfg.intermediate_size == TINY["intermediate_size"]
    attention = model.model.layers[0].self_attn
    if family == "qwen2":
        assert attention.q_proj.bias is not None and attention.q_proj.bias.abs().sum() > 0
    if family == "qwen3":
        assert not torch.all(attention.q_norm.weight == 1)
    if family == "phi3":
        assert hasattr(attention, "qkv_proj")
    windows = getattr(cfg, "layer_types", None)
    if family == "gemma2":
        assert cfg.sliding_window == models.WINDOW and cfg.attn_logit_softcapping
        assert windows == ["sliding_attention", "full_attention"]
    if family == "gemma3":
        assert cfg.sliding_window == models.WINDOW
        assert windows == ["sliding_attention", "sliding_attention"]  # 2 layers: the 6th is full
    if family == "mistral-sliding":
        assert cfg.sliding_window == models.WINDOW
    if family in ("mistral", "phi3"):
        assert cfg.sliding_window is None


def test_the_real_shape_is_smollm2s():
    assert models.SHAPES["smollm2-135m"] == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    }


def _entry(plain: bool, ours16: float, cached: int) -> dict:
    return {
        "dtype": "bfloat16",
        "pool_dtype": "bfloat16",
        "batched": True,
        "plain_step": plain,
        "native_layers": False,
        "their_attention": "sdpa",
        "ours_ms": {"1": 20.0, "16": ours16},
        "theirs_ms": {"1": 30.0, "16": 90.0},
        "reuse_ms": 100.0,
        "cold_ms": 400.0,
        "cached_tokens": cached,
    }


def test_the_table_renders_from_a_result():
    result = {
        "options": models.DEFAULTS,
        "families": {"llama": _entry(True, 45.0, 448), "gemma2": _entry(False, 80.0, 448)},
    }
    table = models.render(result)
    lines = table.splitlines()
    llama = next(line for line in lines if line.startswith("llama"))
    gemma2 = next(line for line in lines if line.startswith("gemma2"))
    assert " plain " in llama and "2.00x" in llama and "4.00x" in llama and llama.endswith("448")
    assert "hf+ours" in gemma2 and "1.12x *" in gemma2
    assert "missed a target: gemma2" in table


def test_quick_measures_two_tiny_families_with_reuse():
    options = {**models.QUICK, "families": ["llama", "gemma3"], "threads": 1, "steps": 2, "rounds": 1}
    result = {"options": options, "families": {f: models.measure(f, options) for f in options["families"]}}
    for family, entry in result["families"].items():
        assert entry["batched"], family
        assert entry["cached_tokens"] > 0 and entry["cold_cached_tokens"] == 0, family
        assert all(ms > 0 for ms in [*entry["ours_ms"].values(), *entry["theirs_ms"].values()])
        assert entry["their_attention"] in ("sdpa", "eager")
    # Both on the plain step: Gemma 3 through its own layout (`llama_step.LAYOUTS`).
    assert result["families"]["llama"]["plain_step"] and result["families"]["gemma3"]["plain_step"]
    assert "gemma3" in models.render(result)


def test_quantized_families_decode_through_the_native_layers():
    """`--weights int8`: both sides quantized alike, ours through the native decode layers for
    every family here (Gemma 3's sliding layers, norms and rotary per layer type included)."""
    options = {
        **models.QUICK,
        "families": ["qwen3", "gemma3"],
        "threads": 1,
        "steps": 2,
        "rounds": 1,
        "weights": "int8",
    }
    result = {"options": options, "families": {f: models.measure(f, options) for f in options["families"]}}
    for family, entry in result["families"].items():
        assert entry["weights"] == "int8" and entry["dtype"] == "bfloat16", family
        assert entry["plain_step"] and entry["native_layers"], family
        assert entry["cached_tokens"] > 0, family
    table = models.render(result)
    assert "weights int8" in table and "plain+native" in table


def test_native_layers_off_decodes_through_the_python_loop():
    """`--native-layers off`: the same plain step with its decode rows through the Python loop, so
    the native layers' share of a step can be measured side by side."""
    assert models.parse_args(["--native-layers", "off"]).native_layers is False
    assert models.parse_args(["--native-layers", "on"]).native_layers is True
    options = {**models.QUICK, "families": ["llama"], "threads": 1, "steps": 2, "rounds": 1}
    on = models.measure("llama", options)
    off = models.measure("llama", {**options, "native_layers": False})
    assert on["plain_step"] and on["native_layers"]
    assert off["plain_step"] and not off["native_layers"]
    assert models._path(off) == "plain" and models._path(on) == "plain+native"

"""The plain step forward (`bulk.models.llama_step`): bit-identical to transformers' forward on the
same step (float and quantized models, prefill chunks and decode rows side by side), taken only for
the models it knows, and the one the engine runs for them."""

from __future__ import annotations

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import batched_attention, hf_cache, llama_step
from bulk.models.batched_attention import Segment
from bulk.models.loader import load_model
from bulk.models.weight_quant import WeightOnlyLinear
from tests.tiny_hf_model import TINY_SHAPE, llama_layout_model, sliding_family_model


def _model(**kw):
    model = load_model(KVCacheConfig(model="demo", device="cpu", **kw)).model
    assert batched_attention.enable(model) is None
    return model


def _both(model, step):
    """A mixed step through both forwards, each on its own pool filled by the same prefills: a chunk
    on top of 9 cached tokens, two decode rows and a fresh chunk."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (9, 20, 31)]
    results = []
    for forward in (lambda *a: batched_attention.forward_step(model, *a), step.forward):
        pool = torch.zeros(
            config.num_hidden_layers, 2, config.num_key_value_heads, 128, head_dim, dtype=param.dtype
        )
        for start, ids in zip((0, 32, 64), prompts, strict=True):
            warm = batched_attention.step_batch(pool, [Segment(start, 0, len(ids))])
            batched_attention.forward_step(model, ids, warm, [len(ids) - 1])
        segments = [Segment(0, 9, 6), Segment(32, 20, 1), Segment(64, 31, 1), Segment(96, 0, 7)]
        batch = batched_attention.step_batch(pool, segments)
        tokens = torch.randint(
            0, config.vocab_size, (15,), generator=torch.Generator().manual_seed(2)
        ).tolist()
        results.append(forward(tokens, batch, [5, 6, 7, 14]))
    return results


def test_a_float_models_step_is_bit_identical_to_transformers():
    model = _model(dtype="float32")
    step, why = llama_step.build(model)
    assert why is None and step is not None
    theirs, ours = _both(model, step)
    assert theirs.shape == ours.shape == (4, model.config.vocab_size)
    assert torch.equal(theirs, ours)


def test_a_quantized_models_step_is_bit_identical_with_fused_projections():
    model = _model(weight_quantization="int4")
    calls: list[int] = []
    forward = WeightOnlyLinear.forward

    def counting(self, x):
        calls.append(self.out_features)
        return forward(self, x)

    # Patched before `build`, which keeps each layer's bound `forward`.
    WeightOnlyLinear.forward = counting  # type: ignore[method-assign]
    try:
        step, why = llama_step.build(model)
        assert why is None and step is not None
        theirs, ours_counted = _both(model, step)
    finally:
        WeightOnlyLinear.forward = forward  # type: ignore[method-assign]
    assert torch.equal(theirs, ours_counted)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    assert qkv in calls and 2 * config.intermediate_size in calls  # the fused layers ran


def test_models_it_does_not_know_keep_transformers_forward():
    model = _model(dtype="float32")
    model.config.hidden_act = "gelu"
    assert llama_step.build(model) == (None, "activation 'gelu' is not silu")
    model.config.hidden_act = "silu"
    model.config.model_type = "gemma2"
    step, why = llama_step.build(model)
    assert step is None and "gemma2" in why


def test_a_forward_that_would_differ_is_refused(monkeypatch):
    """The check at build compares logits: a plain forward that computed otherwise is not used."""
    model = _model(dtype="float32")
    monkeypatch.setattr(llama_step, "_rotate", lambda x, cos, sin: x * cos)
    step, why = llama_step.build(model)
    assert step is None and "differ from transformers" in why


def test_the_engine_runs_llama_models_through_it():
    config = KVCacheConfig(model="demo", device="cpu", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config) as engine:
        answer = engine.process_request_sync({"query": "hello", "max_new_tokens": 4, "temperature": 0})
        assert isinstance(engine._loop.runner.plain_step, llama_step.LlamaStep)
    assert answer["completion_tokens"] == 4


def test_the_check_runs_once_per_named_model(monkeypatch):
    model = _model(dtype="float32")
    runs: list[int] = []
    check = llama_step._differs_from_transformers

    def counting(model, step, decode_attention):
        runs.append(1)
        return check(model, step, decode_attention)

    monkeypatch.setattr(llama_step, "_differs_from_transformers", counting)
    monkeypatch.setattr(llama_step, "_checked", {})
    for _ in range(3):
        step, why = llama_step.build(model, checked_as="demo-test/float32/cpu")
        assert step is not None and why is None
    assert len(runs) == 1
    llama_step.build(model)  # unnamed: checked every time
    assert len(runs) == 2


def test_engines_over_one_model_share_its_fused_layers(monkeypatch):
    model = _model(weight_quantization="int4")
    fuse_calls: list[int] = []
    fuse = llama_step.fuse

    def counting(parts):
        fuse_calls.append(len(parts))
        return fuse(parts)

    monkeypatch.setattr(llama_step, "fuse", counting)
    first, _ = llama_step.build(model)
    calls = len(fuse_calls)
    second, _ = llama_step.build(model)
    assert first is not None and second is not None
    assert calls == 2 * model.config.num_hidden_layers and len(fuse_calls) == calls  # fused once
    # The parts read the one fused copy: building again copied nothing.
    attn = model.model.layers[0].self_attn
    fused = llama_step._fusions[attn.q_proj]
    assert attn.q_proj.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()


def test_the_rotation_is_transformers_bit_for_bit():
    """`_rotate` with the signed sine: four operations where transformers' `apply_rotary_pos_emb`
    takes seven, and the same bits, in every dtype the engine runs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 9, 5, 64, generator=gen).to(dtype)
        k = torch.randn(1, 3, 5, 64, generator=gen).to(dtype)
        angles = torch.randn(1, 5, 64, generator=gen) * 3
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)  # unsqueezes at dim 1 itself
        signed = llama_step._signed(sin.unsqueeze(1))
        assert torch.equal(llama_step._rotate(q, cos.unsqueeze(1), signed), q_ref)
        assert torch.equal(llama_step._rotate(k, cos.unsqueeze(1), signed), k_ref)


def test_keys_and_values_land_in_their_halves_of_the_pool():
    pool = torch.zeros(2, 2, 3, 10, 4)  # (layers, 2, kv_heads, pool_tokens, head_dim)
    batch = batched_attention.step_batch(pool, [Segment(0, 2, 1), Segment(5, 0, 2)])
    kv = torch.arange(6 * 3 * 4, dtype=torch.float32).view(1, 6, 3, 4)  # keys: heads 0-2, values 3-5
    batched_attention.write_kv(pool[1], batch, kv)
    assert torch.equal(pool[1, 0][:, [2, 5, 6]], kv[0, :3])
    assert torch.equal(pool[1, 1][:, [2, 5, 6]], kv[0, 3:])
    assert pool[0].abs().sum() == 0 and pool[1][:, :, [0, 1, 3, 4, 7, 8, 9]].abs().sum() == 0


def _tiny(family: str):
    model = llama_layout_model(family).model
    assert batched_attention.enable(model) is None
    return model


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "smollm3"])
def test_mistral_and_qwen_take_the_plain_step_bit_identically(family):
    model = _tiny(family)
    if family == "qwen2":  # q, k and v carry a bias in Qwen2: the step must add it as transformers does
        assert bool(model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0)
    step, why = llama_step.build(model)
    assert why is None and step is not None
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_layers_take_the_plain_step_bit_identically(family):
    # A window of 8: the step's chunk on top of 9 cached tokens and its rows over 20 and 31 cross it.
    model = sliding_family_model(family).model
    assert batched_attention.enable(model) is None
    step, why = llama_step.build(model)
    assert why is None and step is not None
    assert [layer.window for layer in step.layers] == list(hf_cache.attention_windows(model))
    assert step.native is None  # the native layers attend over whole ranges
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)


def test_llama_3_rope_scaling_takes_the_plain_step_and_dynamic_rope_does_not():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**TINY_SHAPE, "vocab_size": 300}
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # so the test's positions (up to 128) are scaled
    }
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=llama3)).train(False)
    assert batched_attention.enable(model) is None
    step, why = llama_step.build(model)
    assert why is None and step is not None
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)
    model.config.rope_parameters = {**llama3, "rope_type": "dynamic"}
    step, why = llama_step.build(model)
    assert step is None and "'dynamic'" in why

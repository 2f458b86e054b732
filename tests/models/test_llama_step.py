"""The plain step forward (`bulk.models.llama_step`): bit-identical to transformers' forward on the
same step (float and quantized models, prefill chunks and decode rows side by side), taken only for
the models it knows, and the one the engine runs for them."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import batched_attention, hf_cache, llama_step, native
from bulk.models.batched_attention import Segment
from bulk.models.loader import load_model
from bulk.models.weight_quant import WeightOnlyLinear, quantize_weights
from tests.tiny_hf_model import TINY_SHAPE, llama_layout_model, sliding_family_model


def _prefill(model, pool: torch.Tensor, prompts: list[list[int]]) -> None:
    """The prompts' keys and values through transformers' forward, at pool slots 0, 32 and 64."""
    for start, ids in zip((0, 32, 64), prompts, strict=True):
        warm = batched_attention.step_batch(pool, [Segment(start, 0, len(ids))])
        batched_attention.forward_step(model, ids, warm, [len(ids) - 1])


def _model(**kw):
    model = load_model(KVCacheConfig(model="demo", device="cpu", **kw)).model
    assert batched_attention.enable(model) is None
    return model


def _through_both(
    model, step, seed, pool_tokens, segments, tokens, logits_at, decode_attention=None, rows_from=None
):
    """One step through both forwards (transformers' and the plain step), each on its own pool of
    `pool_tokens` filled by the same prefills of 9, 20 and 31 tokens at slots 0, 32 and 64."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (9, 20, 31)]
    results = []
    for forward in (lambda *a: batched_attention.forward_step(model, *a), step.forward):
        pool = torch.zeros(
            config.num_hidden_layers, 2, config.num_key_value_heads, pool_tokens, head_dim, dtype=param.dtype
        )
        _prefill(model, pool, prompts)
        batch = batched_attention.step_batch(pool, segments, decode_attention, rows_from)
        results.append(forward(tokens, batch, logits_at))
    return results


def _both(model, step):
    """A mixed step through both forwards: a chunk on top of 9 cached tokens, two decode rows and a
    fresh chunk."""
    segments = [Segment(0, 9, 6), Segment(32, 20, 1), Segment(64, 31, 1), Segment(96, 0, 7)]
    tokens = torch.randint(
        0, model.config.vocab_size, (15,), generator=torch.Generator().manual_seed(2)
    ).tolist()
    return _through_both(model, step, 1, 128, segments, tokens, [5, 6, 7, 14])


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
    model.config.model_type = "gpt2"
    step, why = llama_step.build(model)
    assert step is None and "'gpt2'" in why
    # A Gemma 2 config over Llama's modules: no sandwich norms to call.
    model.config.model_type, model.config.hidden_activation = "gemma2", "gelu_pytorch_tanh"
    step, why = llama_step.build(model)
    assert step is None and "not laid out as transformers' gemma2" in why


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


def test_a_quantized_smollm3s_layers_without_rotary_take_the_fused_write_bit_identically():
    """In a quantized bfloat16 model (q/k/v fused), the layer without rotary embedding takes the
    native rotary-and-write pass with the identity rotation (made once per step), and the step stays
    transformers' bits."""
    if native.rotary_write_kv() is None:
        pytest.skip("the native code cannot be built here")
    model = _tiny("smollm3").to(torch.bfloat16)
    quantize_weights(model, "int8", torch.bfloat16)
    step, why = llama_step.build(model)
    assert why is None and step is not None
    step._identity = None  # as the build's own check against transformers left it
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)
    assert step._identity is not None  # the unrotated layer went through the fused pass


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_layers_take_the_plain_step_bit_identically(family):
    # A window of 8: the step's chunk on top of 9 cached tokens and its rows over 20 and 31 cross it.
    model = sliding_family_model(family).model
    assert batched_attention.enable(model) is None
    step, why = llama_step.build(model)
    assert why is None and step is not None
    assert [layer.window for layer in step.layers] == list(hf_cache.attention_windows(model))
    assert step.native is not None  # its decode rows through the native layers, windows and all
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


# ---- Gemma 2 and Gemma 3: the same step over their layout (`llama_step.Layout`) ----------------


def _gemma(family: str, dtype: torch.dtype = torch.float32):
    """The tiny sliding Gemma (window 8, alternate layers) with norms that change something: their
    initialisation leaves every `1 + weight` at one. Gemma 3 also soft-caps its logits here (its
    config allows it) and carries an attention soft-cap its attention never passes on, so a step
    that applied it would differ."""
    model = sliding_family_model(family).model.to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(-0.5, 0.5)
    if family == "gemma3":
        model.config.final_logit_softcapping = 30.0
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = 50.0
    assert batched_attention.enable(model) is None
    return model


def _decode_rows(model, step):
    """A step of decode rows only, over 9, 20 and 31 cached tokens (each past the window of 8), with
    the native decode attention the engine's steps use where it is built, through both forwards."""
    from bulk.models import native

    segments = [Segment(0, 9, 1), Segment(32, 20, 1), Segment(64, 31, 1)]
    return _through_both(model, step, 4, 96, segments, [5, 17, 99], [0, 1, 2], native.decode_attention(), 0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_takes_the_plain_step_bit_identically(family):
    model = _gemma(family)
    step, why = llama_step.build(model)
    assert why is None and step is not None
    assert step.layout is (llama_step.GEMMA2 if family == "gemma2" else llama_step.GEMMA3)
    assert [layer.window for layer in step.layers] == list(hf_cache.attention_windows(model)) == [8, None]
    # The Python loop's native prompt operations are Llama's; the native decode layers take every
    # family's (test_native).
    assert step.native is not None and step.prompt_ops is None
    assert all(
        layer.attention_out_norm is not None and layer.mlp_out_norm is not None for layer in step.layers
    )
    if family == "gemma2":  # soft-capped scores on every layer, and logits
        assert [layer.softcap for layer in step.layers] == [50.0, 50.0] and step.logit_softcap == 30.0
        assert step.rotary_kinds == (None,)
    else:  # its local rotary embedding on the sliding layer, the global one on the full layer
        assert [layer.softcap for layer in step.layers] == [None, None] and step.logit_softcap == 30.0
        assert [layer.rotary for layer in step.layers] == ["sliding_attention", "full_attention"]
    # A chunk over 9 cached tokens, decode rows over 20 and 31, a fresh chunk: all past the window.
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)
    theirs, ours = _decode_rows(model, step)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_in_bfloat16_takes_the_plain_step_bit_identically(family):
    model = _gemma(family, torch.bfloat16)
    step, why = llama_step.build(model)
    assert why is None and step is not None
    theirs, ours = _both(model, step)
    assert torch.equal(theirs, ours)
    theirs, ours = _decode_rows(model, step)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_gemma_step_that_would_differ_is_refused(monkeypatch, family):
    """Each part of Gemma's layout is needed: the step with it flipped differs (or fails), and
    `build` refuses. (`head_norms_after_transpose` keeps the model's order of operations; a norm
    over the contiguous last dimension gives the same bits on either view here.)"""
    model = _gemma(family)
    layout = llama_step.LAYOUTS[model.config.model_type]
    for field in ("sandwich", "logit_softcap", "attention_softcap", "rotary_per_layer_type"):
        wrong = replace(layout, **{field: not getattr(layout, field)})
        monkeypatch.setitem(llama_step.LAYOUTS, model.config.model_type, wrong)
        step, why = llama_step.build(model)
        assert step is None and why is not None, field
        assert "differ from transformers" in why or "step failed" in why, why


def test_gemma_3_with_bidirectional_attention_keeps_transformers_forward():
    model = _gemma("gemma3")
    model.config.use_bidirectional_attention = True
    assert llama_step.build(model) == (None, "its attention is bidirectional")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sixteen_gemma_requests_decode_as_one_batch_through_the_plain_step(family):
    """The engine's own loop on the plain step: 16 requests, their prompts past the window, decode
    as one batch, each with the greedy answer it gets alone."""
    from tests.engine.loop_harness import LoopHarness

    lm = sliding_family_model(family)
    rng = random.Random(3)
    prompts = ["".join(rng.choice("abcdefghij ,.") for _ in range(rng.randint(20, 50))) for _ in range(16)]
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, max_batch_size=16)
    params = {"max_new_tokens": 10, "ignore_eos": True, "temperature": 0}
    harness = LoopHarness(lm, config)
    assert isinstance(harness.runner.plain_step, llama_step.LlamaStep)
    sequences = harness.run({0: [(p, params) for p in prompts]})
    assert max(harness.batch_sizes) == 16
    for prompt, seq in zip(prompts, sequences, strict=True):
        alone = LoopHarness(lm, config)
        (solo,) = alone.run({0: [(prompt, params)]})
        assert max(alone.batch_sizes) == 1
        expected = alone.results[solo.request.request_id]["result"]
        assert harness.results[seq.request.request_id]["result"] == expected


def test_gemmas_norm_with_its_factor_computed_once_is_the_modules_bit_for_bit():
    """`_one_plus_norm`: Gemma's RMS norm with `1 + weight` computed at build, not per call, gives
    its module's bits, in every dtype the engine runs; other norms are not taken for it."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(5)
    for kind in (Gemma2RMSNorm, Gemma3RMSNorm):
        for dtype in (torch.float32, torch.bfloat16):
            norm = kind(64, eps=1e-6).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(64, generator=gen))
            fast = llama_step._one_plus_norm(norm)
            assert fast is not None
            x = (torch.randn(1, 7, 64, generator=gen) * 5).to(dtype)
            assert torch.equal(fast(x), norm(x))
            heads = x.view(1, 7, 4, 16).transpose(1, 2)  # a head norm's transposed view (Gemma 3)
            head_norm = kind(16, eps=1e-6).to(dtype)
            assert torch.equal(llama_step._one_plus_norm(head_norm)(heads), head_norm(heads))
    assert llama_step._one_plus_norm(LlamaRMSNorm(64)) is None

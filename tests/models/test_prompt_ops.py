"""The prompt path's fused bfloat16 residual add and RMS norm (`csrc/prompt_ops.cpp`, through
`bulk.models.native.add_rms_norm`): bit for bit the ATen operations transformers' LlamaRMSNorm runs,
and a bfloat16 model's step through them bit for bit transformers' forward."""

from __future__ import annotations

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.models import batched_attention, llama_step, native
from bulk.models.loader import load_model
from tests.models.test_llama_step import _both


def _fused():
    op = native.add_rms_norm()
    if op is None:
        pytest.skip("the native library cannot be built here")
    return op


def _aten(x, residual, weight, eps):
    """transformers' LlamaRMSNorm after the residual add, op for op."""
    hidden = x if residual is None else residual + x
    h = hidden.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return hidden, weight * h.to(hidden.dtype)


def _fused_here(n: int) -> bool:
    """Whether the kernel (not ATen's sequence) runs for rows of `n` on this CPU."""
    return torch.ops.bul.mean_square(torch.zeros(1, n, dtype=torch.bfloat16)).numel() > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 576), (1, 3, 17), (1, 5, 100), (2, 7, 960), (1, 512, 576), (1, 2, 4097), (1, 9, 8), (1, 4, 7)],
)
def test_the_fused_norm_is_atens_bit_for_bit(shape, threads):
    op = _fused()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(shape[-1] * 7 + shape[-2])
        n = shape[-1]
        for trial in range(4):
            # a wide range of magnitudes per row, as activations have
            scale = torch.exp(torch.randn(*shape[:-1], 1, generator=gen) * 3)
            x = (
                torch.randn(*shape, generator=gen) * scale * torch.exp(torch.randn(*shape, generator=gen))
            ).bfloat16()
            residual = (torch.randn(*shape, generator=gen) * scale).bfloat16()
            weight = torch.randn(n, generator=gen).bfloat16()
            eps = (1e-5, 1e-6)[trial % 2]
            for res in (None, residual):
                hidden, normed = op(x, res, weight, eps)
                theirs_hidden, theirs_normed = _aten(x, res, weight, eps)
                assert torch.equal(hidden, theirs_hidden)
                assert torch.equal(normed, theirs_normed)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("n", [8, 9, 16, 17, 31, 64, 100, 576, 577, 960, 2048, 4096, 5000, 8192])
def test_the_mean_square_sums_in_atens_order(n):
    """The sum of squares in float32, compared before any rounding to bfloat16 hides a difference."""
    _fused()
    if not _fused_here(n):
        pytest.skip("ATen's sum here is not the AVX2 kernel the native norm reproduces")
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(33, n, generator=gen) * torch.exp(torch.randn(33, n, generator=gen) * 2)).bfloat16()
    assert torch.equal(torch.ops.bul.mean_square(x), x.float().pow(2).mean(-1))


def test_other_dtypes_run_atens_sequence():
    op = _fused()
    x = torch.randn(1, 4, 64)
    weight = torch.randn(64)
    hidden, normed = op(x, x, weight, 1e-5)
    theirs_hidden, theirs_normed = _aten(x, x, weight, 1e-5)
    assert torch.equal(hidden, theirs_hidden) and torch.equal(normed, theirs_normed)


def _bfloat16_model(**kw):
    model = load_model(KVCacheConfig(model="demo", device="cpu", dtype="bfloat16", **kw)).model
    assert batched_attention.enable(model) is None
    return model


@pytest.mark.parametrize("weights", ["none", "int4"])
def test_a_bfloat16_step_through_the_fused_norms_is_transformers_bit_for_bit(weights):
    _fused()
    model = _bfloat16_model(weight_quantization=weights)
    step, why = llama_step.build(model)  # its check against transformers ran with the fused norms
    assert why is None and step is not None and step.prompt_ops is not None
    calls = []
    fused = step.prompt_ops
    step.prompt_ops = lambda *a: calls.append(1) or fused(*a)
    theirs, ours = _both(model, step)
    assert calls, "the step's layers went through the fused norms"
    assert torch.equal(theirs, ours)


def test_a_fused_norm_that_would_differ_is_dropped_at_build(monkeypatch):
    fused = _fused()

    def off_by_one_bit(x, residual, weight, eps):
        hidden, normed = fused(x, residual, weight, eps)
        return hidden, (normed.view(torch.int16) ^ 1).view(torch.bfloat16)

    monkeypatch.setattr(native, "add_rms_norm", lambda: off_by_one_bit)
    step, why = llama_step.build(_bfloat16_model())
    assert why is None and step is not None and step.prompt_ops is None

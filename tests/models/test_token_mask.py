"""The native token mask (`csrc/token_mask.cpp`, `native.apply_token_bitmask`) against ATen's way
(`structured.apply_bitmask`): the same row, float32 and bfloat16, for sparse, half and nearly full
masks, a vocabulary that is not a multiple of 32 and logits wider than the mask (padded embedding
rows, never allowed)."""

from __future__ import annotations

import pytest
import torch

from bulk.generation.structured import apply_bitmask
from bulk.models import native


def _mask(allowed: torch.Tensor) -> torch.Tensor:
    words = -(-allowed.numel() // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.5, 0.999, 1.0])
@pytest.mark.parametrize(("vocab", "width"), [(49152, 49152), (259, 259), (1000, 1064)])
def test_native_mask_equals_atens(dtype, density, vocab, width):
    kernel = native.apply_token_bitmask()
    if kernel is None:
        pytest.skip("no C++ compiler here: the engine uses ATen's way, tested by the engine's tests")
    generator = torch.Generator().manual_seed(vocab + int(density * 1000))
    mask = _mask(torch.rand(vocab, generator=generator) < density)
    logits = torch.randn(width, generator=generator).to(dtype)
    ours, aten = logits.clone(), logits.clone()
    kernel(ours, mask)
    apply_bitmask(aten, mask)
    assert torch.equal(ours, aten)
    assert torch.isinf(ours[mask.numel() * 32 :]).all()
    assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(aten).sum())

"""Prepacked dense layers (`bulk.models.packed_linear`): bit for bit what `F.linear` computes, applied
by the loader to unquantized bfloat16 models on the CPU (not to float32 ones, quantized ones or in
batch-invariant mode), tied weights left alone, a model's logits unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bulk.config import KVCacheConfig
from bulk.models import packed_linear
from bulk.models.loader import load_model
from bulk.models.packed_linear import PackedLinear, pack_linear_weights

needs_onednn = pytest.mark.skipif(
    not packed_linear._onednn_bf16(), reason="torch multiplies bfloat16 without oneDNN here"
)


def _packed_count(model: nn.Module) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_multiplies_as_f_linear_does(bias):
    torch.manual_seed(0)
    linear = nn.Linear(128, 256, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    assert packed.weight.is_mkldnn and packed.weight.dtype == torch.bfloat16
    for rows in (1, 16, 300):
        x = torch.randn(1, rows, 128).to(torch.bfloat16)
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))


@needs_onednn
def test_the_loader_packs_a_bfloat16_model_and_its_logits_do_not_change():
    def load(**kw):
        return load_model(KVCacheConfig(model="demo", device="cpu", dtype="bfloat16", **kw)).model

    plain = load(batch_invariant=True)  # batch-invariant mode keeps plain layers
    packed = load()
    assert _packed_count(plain) == 0 and _packed_count(packed) > 0
    plain_left = [m for m in packed.modules() if type(m) is nn.Linear and not _tied(packed, m)]
    assert not plain_left  # every untied bfloat16 layer packed
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.inference_mode():
        assert torch.equal(packed(input_ids=ids).logits, plain(input_ids=ids).logits)


def _tied(model: nn.Module, linear: nn.Module) -> bool:
    return any(
        m is not linear and any(p is linear.weight for p in m.parameters(recurse=False))
        for m in model.modules()
    )


def test_float32_and_quantized_models_are_not_packed():
    assert _packed_count(load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32")).model) == 0
    quantized = load_model(
        KVCacheConfig(model="demo", device="cpu", dtype="bfloat16", weight_quantization="int8")
    ).model
    assert _packed_count(quantized) == 0


@needs_onednn
def test_a_tied_head_is_left_plain():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.proj = nn.Linear(32, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.embed.weight

    model = Tied().to(torch.bfloat16)
    assert pack_linear_weights(model) == 1
    assert isinstance(model.proj, PackedLinear) and type(model.head) is nn.Linear
    assert model.head.weight is model.embed.weight

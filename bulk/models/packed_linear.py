"""Dense bfloat16 linear layers with their weights prepacked for oneDNN: a transform applied to a
loaded, unquantized bfloat16 model on the CPU (as `weight_quant` is to a quantized one), so that the
model code and the engine stay unaware of it.

Why: torch multiplies bfloat16 matrices on the CPU through oneDNN, and `F.linear` over a plain
weight has oneDNN reorder that weight into its blocked layout at every call, reading and writing
the whole weight again. A decode step reads every weight once, so that reorder is most of its cost
beside the product itself: SmolLM2's 30 layers at 16 rows took 19 ms through `F.linear` and 12.5 ms
prepacked (`weight_quant.pack_dense`, Intel Xeon with AMX-BF16, 2 threads). The products are
bit-identical to `F.linear`'s (`tests/models/test_packed_linear.py` checks it on the machine it
runs on), so a model computes exactly what it computed before; only its speed changes.

The packed weight replaces the plain one (no second copy). Code that reads `layer.weight` for its
dtype, device or shape still finds them; code that computes with it directly (rather than calling
the layer) would not work, and none of transformers' decoder layers do. A weight tied to another
tensor (an LM head sharing the embedding table) is left plain: packing it would make a second copy
of the table."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from bulk.models.weight_quant import _onednn_bf16, dense_product, pack_dense

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """`nn.Linear` over a weight prepacked for oneDNN: the same outputs, bit for bit."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = pack_dense(linear.weight.detach())  # (out, in), oneDNN's blocked layout
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_product(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def can_pack(model: Any) -> bool:
    """Whether `pack_linear_weights` applies: a bfloat16 model on the CPU where torch multiplies
    bfloat16 matrices through oneDNN."""
    param = next(model.parameters(), None)
    return (
        param is not None and param.device.type == "cpu" and param.dtype == torch.bfloat16 and _onednn_bf16()
    )


def pack_linear_weights(model: Any) -> int:
    """Swap `model`'s bfloat16 `nn.Linear` layers for `PackedLinear`, in place, where `can_pack`;
    returns how many were swapped. Layers whose weight is shared with another module (tied
    embeddings) stay as they are."""
    if not can_pack(model):
        return 0
    shared = _shared_weights(model)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.dtype == torch.bfloat16
                and id(child.weight) not in shared
            ):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    log.info("%d linear layers prepacked for oneDNN", swapped)
    return swapped


def _shared_weights(model: Any) -> set[int]:
    """The ids of parameters that more than one module holds (a tied LM head and embedding)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return {pid for pid, count in holders.items() if count > 1}

"""Weight-only quantization: a loaded model's linear layers swapped for 8- or 4-bit ones, applied from
outside as a transform (as gpt-fast does), so the model code and the engine stay unaware of it.

Why: decoding one request reads every weight once per token, and on a CPU that read is the cost. A
step of SmolLM2-135M (one request, one torch thread, 2-core development machine) took 48.8 ms with
bfloat16 weights, 30.5 ms with int8 and 19.8 ms with int4 (`torch.ops.aten._weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu`, the CPU kernels behind torchao's weight-only schemes).

    int8   every linear layer, the LM head included: one int8 per weight, one scale per output row
    int4   the transformer blocks' linear layers: 4 bits per weight, a scale and an offset per group of
           32 input weights (llama.cpp's Q4_1 layout, so a Q4_1 GGUF file's weights come through
           unchanged up to the bfloat16 rounding of their scales); the LM head as in int8 (GGUF files
           keep it at 8 bits or more too: it is the layer most sensitive to rounding)

Those kernels win only for a few rows. From `DENSE_FROM_ROWS` rows on (prompt chunks, wide decode
batches), or from fewer where the CPU says so (`measure_dense_from_rows`), torch's bfloat16 GEMM is
faster (on SmolLM2, a forward of 64 new tokens took 217 ms through the dequantized weights against
322 ms through the int4 kernel; at 16 tokens the kernel still won), so each layer also keeps its
quantized weights dequantized into bfloat16 and multiplies many rows with that (prepacked for oneDNN
where torch's bfloat16 products go through it: `pack_dense`). Both paths use the same weight values
(the dequantized ones); they differ only in rounding. That copy costs memory (int4: 1.25x the
bfloat16 model, not 0.25x; up to 2.25x with the prepacked copies): this transform buys decode
speed, not memory. On a CPU without bfloat16 instructions the copy is float32 (2.25x), and many
rows are multiplied in float32: torch emulates bfloat16 GEMMs there, and a 1,024-token SmolLM2
prompt took 16.0 s through bfloat16 copies against 3.5 s through float32 ones (AMD EPYC with AVX2,
2 threads).

The kernels take bfloat16 activations (float32 ones ran 6-26x slower), so a quantized model runs in
bfloat16; they are torch's CPU kernels, so quantization is applied on the CPU only.

Torch's kernels dequantize the weights again for every row, so their cost grows with the rows: the
gate/up projection of SmolLM2 took 98 us for 1 row and 757 us for 16 (one thread, Intel Xeon with
AMX-BF16), and a decode batch of a dozen rows went through the dense copy, memory-bound on its 7 MB a
layer. Where the CPU has AMX tiles or AVX512-BF16 and the native code is built (`native.tile_linear`),
each layer also keeps its quantized weights in the tile unit's layout (`tiles=True`), and from
`tiles_from_rows` rows on multiplies through `csrc/tile_linear.cpp`: every weight block dequantized
once, to the dense copy's bfloat16 values exactly, and multiplied with all the rows by the tile unit
(16 rows: 169 us; 1 row stays faster in torch's kernel), or without one by the vector unit's pair
dot product (16 rows on one Zen 4 thread: 388 us against torch's kernel's 748). Its sums run in one
order whatever the rows, so a row's outputs do not change with the rows beside it
(`tests/models/test_weight_quant.py`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
GROUP_SIZE = 32
# At this many rows and more, a layer multiplies with its dequantized bfloat16 weight (see above).
# SmolLM2, whole forwards of n new tokens over 992 cached, int4 kernel against dense, 1 and 2 torch
# threads: n = 8: 63/135 and 39/57 ms; 16: 111/117 and 58/69; 29: 164/149 and 98/90.
DENSE_FROM_ROWS = 24
# With a float32 copy (CPUs without bfloat16 instructions) the kernel stays faster for longer: the
# four weight shapes of a SmolLM2 layer, int4 kernel against float32 GEMM, AMD EPYC with AVX2, 2
# threads, per 8 layers: 24 rows 29 / 52 ms, 32: 51 / 55, 48: 65 / 50. The split stays at 24 rows
# all the same, so that a prompt takes the same path on every CPU: at 48, SmolLM2's 37-token chat
# prompt "What is the capital of France?" went through the kernel, whose outputs differ from the
# GEMM's in the last bfloat16 bit, and its greedy answer turned from "The capital of France is
# Paris." into a French non-answer. A 135M 4-bit model is that sensitive to rounding.
# Where the CPU multiplies bfloat16 matrices in hardware much faster than the kernels dequantize
# (AMX tiles), the dense copy wins far earlier: the four weight shapes of a SmolLM2 layer, int4
# kernel against bfloat16 GEMM, Intel Xeon with AMX-BF16, 2 threads, per 30 layers: 12 rows 15 / 9
# ms, 16: 20 / 9, 24: 30 / 9. So the split is measured once per process on the model's own shapes
# (`measure_dense_from_rows`) and only ever lowered from DENSE_FROM_ROWS: a prompt chunk still
# takes the dense path on every CPU.
DENSE_WIN_MARGIN = 0.8  # the dense copy must be this much faster, so that close calls do not flip
# With tiles (see the module's docstring) the tile kernel takes over from torch's at this many rows,
# unless measured otherwise (`measure_tiles_from_rows`); the dense copy's split is then measured
# against the tile kernel, up to `TILES_DENSE_FROM_MAX` rows (the tile kernel multiplies the dense
# copy's own values, so its outputs differ from the dense product's by summation order only).
TILES_FROM_ROWS = 4
# The tile kernel must be this much faster than torch's to take over: a smaller margin than the
# dense copy's, because its products are the dense copy's own, so a close call changes less (the
# LM head's one row, SmolLM2 at int8: 2.9 ms against 3.6).
TILES_WIN_MARGIN = 0.9
TILES_DENSE_FROM_MAX = 64
TILE_INPUTS = 32  # a tile's inputs: one int4 group
# The outputs torch's int4 layout (`_convert_weight_to_int4pack_for_cpu`) packs together (`fuse`).
INT4_PACK_BLOCK = 64
ACTIVATION_DTYPE = torch.bfloat16


class WeightOnlyLinear(nn.Module):
    """A linear layer with quantized weights: `rows < dense_from_rows` (`set_dense_from_rows`) go
    through the quantized kernel, more through the dequantized copy; with `tiles`, from
    `tiles_from_rows` rows on (`set_tiles_from_rows`) through the tile kernel (see the module's
    docstring)."""

    dense_from_rows = DENSE_FROM_ROWS
    tiles_from_rows = TILES_FROM_ROWS

    def __init__(
        self,
        linear: nn.Linear,
        bits: int,
        group_size: int = GROUP_SIZE,
        dense_dtype: torch.dtype = ACTIVATION_DTYPE,
        tiles: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        weight = linear.weight.detach().float()  # (out, in)
        if bits == 8:
            self.qweight, self.scales, dense, q = _quantize_int8(weight)
        else:
            self.qweight, self.scales, dense, q = _quantize_int4(weight, group_size)
        self.dense = dense.to(dense_dtype)  # (out, in): the quantized values, for many rows
        self._packed: torch.Tensor | None = None  # `dense_weight`'s, made on first use
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().to(ACTIVATION_DTYPE)
        # (weights, scales) in the tile kernel's layout (`tile_layout`), or None
        self.tiles: tuple[torch.Tensor, torch.Tensor] | None = None
        if (
            tiles
            and dense_dtype == ACTIVATION_DTYPE
            and tiles_fit(self.in_features, self.out_features, group_size)
        ):
            self.tiles = tile_layout(q, self.scales, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.dense_from_rows:
            if self.dense.dtype != x.dtype:  # a float32 copy (CPUs without bfloat16 instructions)
                bias = None if self.bias is None else self.bias.to(self.dense.dtype)
                return F.linear(x.to(self.dense.dtype), self.dense, bias).to(x.dtype)
            return dense_product(x, self.dense_weight(), self.bias)
        if self.tiles is not None and rows >= self.tiles_from_rows:
            return torch.ops.bul.tile_linear(x, self.tiles[0], self.tiles[1], self.bits, self.bias)
        flat = x.reshape(rows, self.in_features)
        # Called as `torch._weight_...` rather than `torch.ops.aten._weight_...`: the same kernel
        # through torch's C++ argument parsing, not the op packet's Python one (0.7 us a call less).
        if self.bits == 8:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """What many rows are multiplied with: the dense copy, prepacked into oneDNN's blocked
        layout where torch's bfloat16 products go through oneDNN (`pack_dense`), else the copy."""
        if self._packed is None:
            self._packed = pack_dense(self.dense)
        return self._packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def fuse(parts: list[WeightOnlyLinear]) -> WeightOnlyLinear | None:
    """One layer computing `parts` side by side (their outputs concatenated), or None when they do
    not share an input and a bit width. The quantized kernels compute each output from its own row
    of weights, so the fused layer's outputs are bit-identical to the parts'; one call instead of
    three (q, k, v) or two (gate, up) saves a kernel launch and a pass over the input per step. The
    parts keep working, their weights now views into the fused ones: no memory is added but the
    scales (one per group of 32 weights)."""
    first = parts[0]
    key = (first.in_features, first.bits, first.group_size, first.dense.dtype)
    if len(parts) < 2 or any((p.in_features, p.bits, p.group_size, p.dense.dtype) != key for p in parts):
        return None
    if len({p.bias is None for p in parts}) > 1:
        return None
    # torch's int4 layout packs the outputs in blocks of 64: the parts' rows side by side are the
    # fused layer's only where every block lies within one part (a last part's shorter tail is
    # packed alike on both sides). Tiny models' 32-output k/v projections are not.
    if first.bits == 4 and any(p.out_features % INT4_PACK_BLOCK for p in parts[:-1]):
        return None
    fused = WeightOnlyLinear.__new__(WeightOnlyLinear)
    nn.Module.__init__(fused)
    fused.in_features, fused.bits, fused.group_size = first.in_features, first.bits, first.group_size
    fused.out_features = sum(p.out_features for p in parts)
    fused.qweight = torch.cat([p.qweight for p in parts])  # (out, in) int8 / (out, in / 2) packed int4
    fused.dense = torch.cat([p.dense for p in parts])  # (out, in)
    # int8: (out,); int4: (groups, out, 2)
    fused.scales = torch.cat([p.scales for p in parts], dim=0 if first.bits == 8 else 1)
    fused.bias = None if first.bias is None else torch.cat([p.bias for p in parts if p.bias is not None])
    fused.dense_from_rows = first.dense_from_rows
    fused.tiles_from_rows = first.tiles_from_rows
    fused._packed = None
    # The tile layout is a sequence of 16-output blocks: the parts' blocks one after another.
    tiles = [p.tiles for p in parts]
    fused.tiles = None
    if all(t is not None for t in tiles):
        fused.tiles = (
            torch.cat([t[0] for t in tiles if t is not None]),
            torch.cat([t[1] for t in tiles if t is not None]),
        )
    row = 0
    for p in parts:
        p.qweight = fused.qweight[row : row + p.out_features]
        p.dense = fused.dense[row : row + p.out_features]
        row += p.out_features
    return fused


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric, one scale per output row: q = round(w / s), s = max|w_row| / 127. Returns the
    kernel's weights and scales, the dense copy (float32) and q."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
    q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (out, in)
    scales = scale.to(ACTIVATION_DTYPE)
    return q, scales, q.float() * scales.float()[:, None], q


def _quantize_int4(
    weight: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric, per group of `group` input weights: w = (q - 8) * scale + zero, q in 0..15, with
    scale = (max - min) / 15 and zero = min + 8 * scale, the kernel's convention. Returns the
    kernel's packed weights and (groups, out, 2) scales, the dense copy (float32) and q (out, in)."""
    out, inp = weight.shape
    groups = weight.view(out, inp // group, group)  # (out, groups, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((groups - low) / scale).round().clamp(0, 15)
    # The kernel computes with bfloat16 scales and offsets; the dequantized copy uses the same ones.
    scale_b = scale.to(ACTIVATION_DTYPE)
    zero_b = (low + 8 * scale).to(ACTIVATION_DTYPE)
    dense = ((q - 8) * scale_b.float() + zero_b.float()).view(out, inp)
    scales_and_zeros = torch.cat([scale_b, zero_b], dim=-1)  # (out, groups, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out, inp).to(torch.int32), 1)
    # (groups, out, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous(), dense, q.view(out, inp).to(torch.uint8)


def _int4_fits(linear: nn.Linear, group: int) -> bool:
    # The kernel's packing needs whole groups along the input and outputs in multiples of 16.
    return linear.in_features % group == 0 and linear.out_features % 16 == 0


def tiles_fit(in_features: int, out_features: int, group: int = GROUP_SIZE) -> bool:
    """Whether a layer's weights can be laid out in tiles: 16-output blocks by 32-input groups (an
    int4 layer's groups must be those)."""
    return in_features % TILE_INPUTS == 0 and out_features % 16 == 0 and group == TILE_INPUTS


def tile_layout(q: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile kernel's (weights, scales) from q (out, in) and the kernel's scales (int8: (out,);
    int4: (groups, out, 2) scale and zero). A tile is 16 outputs by 32 inputs; its 16 rows hold the
    input pairs (2r, 2r + 1) of its 16 outputs side by side, 32 values a row in the order
    p = 2 * output + parity, the pair layout the tile unit multiplies (`csrc/tile_linear.cpp`):

        int4  weights (out/16, in/32, 16, 16) uint8, byte j = v[j] | v[j + 16] << 4
              scales  (out/16, in/32, 2, 16) bfloat16: a tile's 16 scales, then its 16 zeros
        int8  weights (out/16, in/32, 16, 32) int8;  scales (out/16, 16) bfloat16"""
    out, inp = q.shape
    blocks, groups = out // 16, inp // TILE_INPUTS
    # (block, output, group, row, parity) -> (block, group, row, output, parity)
    v = q.view(blocks, 16, groups, 16, 2).permute(0, 2, 3, 1, 4).reshape(blocks, groups, 16, 32)
    if bits == 8:
        return v.contiguous(), scales.view(blocks, 16).contiguous()
    nibbles = v.to(torch.uint8)
    packed = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).contiguous()
    # (groups, out, 2) -> (block, group, scale or zero, output)
    per_tile = scales.view(groups, blocks, 16, 2).permute(1, 0, 3, 2).contiguous()
    return packed, per_tile


def quantize_weights(
    model: Any, scheme: str, dense_dtype: torch.dtype = ACTIVATION_DTYPE, tiles: bool = False
) -> dict[str, int]:
    """Swap `model`'s linear layers for quantized ones, in place (see the module's docstring).
    `model` must be a bfloat16 model on the CPU; `dense_dtype` is the dtype of the dense copies that
    multiply many rows; `tiles`: keep the weights in the tile kernel's layout too, where it is built
    (`native.tile_linear`). Returns how many layers got each bit width."""
    if scheme not in SCHEMES:
        raise ValueError(f"weight quantization {scheme!r} is not one of {SCHEMES}")
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != ACTIVATION_DTYPE:
        raise ValueError(
            f"weight quantization needs a bfloat16 model on the CPU, not {param.dtype} on {param.device}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts = {"int8": 0, "int4": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            bits = 8 if scheme == "int8" or child is head else 4
            if bits == 4 and not _int4_fits(child, GROUP_SIZE):
                bits = 8  # int8 fits any shape
            setattr(parent, name, WeightOnlyLinear(child, bits, dense_dtype=dense_dtype, tiles=tiles))
            counts[f"int{bits}"] += 1
    log.info("weights quantized (%s): %d layers int4, %d int8", scheme, counts["int4"], counts["int8"])
    return counts


def pack_dense(dense: torch.Tensor) -> torch.Tensor:
    """`dense` (out, in) prepacked for oneDNN's matrix products, where torch multiplies bfloat16
    matrices through oneDNN; else `dense` itself. Why: `F.linear` over a plain weight has oneDNN
    reorder it into its blocked layout at every call, which reads and writes the whole weight again:
    SmolLM2's 30 layers at 16 rows took 19 ms through `F.linear` and 12.5 ms prepacked, 1 row 18 and
    13 ms, 512 rows 10 % less (Intel Xeon with AMX-BF16, 2 threads). The products are bit-identical
    to `F.linear`'s (`tests/models/test_weight_quant.py` checks it on the machine it runs on). The
    packed copy is memory of its own, beside the plain one (whose views the unfused parts of a fused
    layer read): made on first use, so only for the layers the engine multiplies many rows with
    (a Llama model's fused q/k/v and gate/up, its other projections and the LM head)."""
    if dense.dtype != torch.bfloat16 or dense.device.type != "cpu" or not _onednn_bf16():
        return dense
    return torch.ops.mkldnn._reorder_linear_weight(dense, DENSE_FROM_ROWS)


def dense_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) times `weight` (`WeightOnlyLinear.dense_weight`: packed or plain), plus `bias`."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


@functools.cache
def _onednn_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def set_dense_from_rows(model: Any, rows: int, bits: int | None = None) -> None:
    """Every quantized layer of `model` (of `bits` bits, or every one) multiplies `rows` rows or
    more with its dense copy."""
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear) and bits in (None, module.bits):
            module.dense_from_rows = rows


def dense_shapes(model: Any, bits: int) -> list[tuple[int, int]]:
    """The distinct (in, out) shapes of `model`'s `bits`-bit layers: what `measure_dense_from_rows`
    times, and what a remembered measure of it is keyed by."""
    return sorted({(m.in_features, m.out_features) for m in model.modules() if _quantized(m, bits)})


def set_tiles_from_rows(model: Any, rows: int, bits: int | None = None) -> None:
    """Every quantized layer of `model` (of `bits` bits, or every one) that has tiles multiplies
    `rows` rows or more (below its dense split) through the tile kernel."""
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear) and bits in (None, module.bits):
            module.tiles_from_rows = rows


def measure_dense_from_rows(model: Any, bits: int) -> int:
    """The fewest rows from which `model`'s `bits`-bit layers multiply faster through their dense
    copies (prepacked as they would be) than through what multiplies fewer rows (the tile kernel
    where the layers have tiles, else torch's quantized kernel), on this CPU: every distinct weight
    shape timed at each candidate row count, both ways (about 50 ms). `DENSE_FROM_ROWS` (with tiles
    `TILES_DENSE_FROM_MAX`) when the dense copy does not win by `DENSE_WIN_MARGIN` at some candidate
    and every larger one. The timing's packed copies are dropped afterwards: only the layers that
    the engine multiplies many rows with keep one."""
    layers = _layers_by_shape(model, bits)
    if not layers:
        return DENSE_FROM_ROWS
    with_tiles = all(layer.tiles is not None for layer in layers.values())
    candidates = (8, 12, 16, 24, 32, 48, TILES_DENSE_FROM_MAX) if with_tiles else (4, 8, 12, 16, 20)
    small = _tile_product if with_tiles else _kernel_product
    packed = {shape: pack_dense(layer.dense) for shape, layer in layers.items()}

    def dense(x: torch.Tensor, layer: WeightOnlyLinear) -> torch.Tensor:
        shape = (layer.in_features, layer.out_features)
        return dense_product(x.to(layer.dense.dtype), packed[shape], None)

    rows = _fewest_rows_won(layers, candidates, small, dense, f"int{bits} dense")
    return rows if rows is not None else (TILES_DENSE_FROM_MAX if with_tiles else DENSE_FROM_ROWS)


def measure_tiles_from_rows(model: Any, bits: int, candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8)) -> int:
    """The fewest rows from which `model`'s `bits`-bit layers multiply faster through the tile
    kernel than through torch's quantized kernel (timed as `measure_dense_from_rows` times), or
    `TILES_DENSE_FROM_MAX` (never, below the dense split) when the tiles do not win; `TILES_FROM_ROWS`
    for layers without tiles."""
    layers = _layers_by_shape(model, bits)
    if not layers or any(layer.tiles is None for layer in layers.values()):
        return TILES_FROM_ROWS
    rows = _fewest_rows_won(
        layers, candidates, _kernel_product, _tile_product, f"int{bits} tiles", TILES_WIN_MARGIN
    )
    return rows if rows is not None else TILES_DENSE_FROM_MAX


def _layers_by_shape(model: Any, bits: int) -> dict[tuple[int, int], WeightOnlyLinear]:
    layers: dict[tuple[int, int], WeightOnlyLinear] = {}
    for module in model.modules():
        if _quantized(module, bits):
            layers.setdefault((module.in_features, module.out_features), module)
    return layers


Product = Callable[[torch.Tensor, "WeightOnlyLinear"], torch.Tensor]


def _fewest_rows_won(
    layers: dict[tuple[int, int], WeightOnlyLinear],
    candidates: tuple[int, ...],
    current: Product,
    challenger: Product,
    name: str,
    margin: float = DENSE_WIN_MARGIN,
) -> int | None:
    """The fewest candidate rows from which `challenger` beats `current` by `margin` over all of
    `layers` at that candidate and every larger one, or None."""
    generator = torch.Generator().manual_seed(0)
    wins = []
    with torch.inference_mode():
        for rows in candidates:
            slow = fast = 0.0
            for layer in layers.values():
                x = torch.randn((rows, layer.in_features), generator=generator).to(ACTIVATION_DTYPE)
                cold = layer.qweight.numel() * layer.qweight.element_size() > COLD_FROM_BYTES
                slow += _best_seconds(functools.partial(current, x, layer), cold=cold)
                fast += _best_seconds(functools.partial(challenger, x, layer), cold=cold)
            wins.append(fast < margin * slow)
            log.debug("%d rows, %s: %.0f us against %.0f us", rows, name, fast * 1e6, slow * 1e6)
    for i, rows in enumerate(candidates):
        if all(wins[i:]):
            return rows
    return None


def _quantized(module: Any, bits: int) -> bool:
    return isinstance(module, WeightOnlyLinear) and module.bits == bits


def _kernel_product(x: torch.Tensor, layer: WeightOnlyLinear) -> torch.Tensor:
    if layer.bits == 8:
        return torch._weight_int8pack_mm(x, layer.qweight, layer.scales)
    return torch._weight_int4pack_mm_for_cpu(x, layer.qweight, layer.group_size, layer.scales)


def _tile_product(x: torch.Tensor, layer: WeightOnlyLinear) -> torch.Tensor:
    assert layer.tiles is not None
    return torch.ops.bul.tile_linear(x, layer.tiles[0], layer.tiles[1], layer.bits, None)


def _best_seconds(product: Callable[[], torch.Tensor], repeats: int = 7, cold: bool = False) -> float:
    """The median seconds of `product` after a first run (which pays for allocations). `cold`: with
    the caches filled by other data before each run, as a decode step finds a large layer (an LM
    head's 28 MB), having read every other layer since its last use. Warm, torch's 8-bit kernel
    multiplied SmolLM2's head by one row in 2.2 ms and the tile kernel in 2.6; cold, in 5.0 and 3.7,
    and a real decode step was 1.2 ms faster through the tiles."""
    times = []
    for _ in range(repeats):
        if cold:
            _evict_caches()
        started = time.perf_counter()
        product()
        times.append(time.perf_counter() - started)
    rest = sorted(times[1:])
    return rest[len(rest) // 2]


# Layers larger than this are timed cold (`_best_seconds`): they do not stay in a core's caches
# between two uses in a decode step.
COLD_FROM_BYTES = 8 << 20


@functools.cache
def _eviction_buffer() -> torch.Tensor:
    return torch.zeros(16 << 20)  # 64 MB of float32


def _evict_caches() -> None:
    _eviction_buffer().add_(1.0)  # written, so that the lines are the buffer's, dirty

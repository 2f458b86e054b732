"""Weight-only quantization (`bulk.models.weight_quant`): the quantized layers compute with the
weights they claim (both the few-row kernels and the many-row dequantized copy), the loader applies
the transform where the configuration asks (and `auto` where a GGUF file is quantized), the
fingerprint separates quantized weights from the others, and bad combinations are clear errors."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bulk import named_models as registry
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import InvalidConfigError, ModelLoadError
from bulk.models import native, weight_quant
from bulk.models.gguf import MANIFEST, manifest_weight_bits, weight_bits
from bulk.models.loader import load_model, resolve_weight_quantization
from bulk.models.weight_quant import DENSE_FROM_ROWS, WeightOnlyLinear, quantize_weights
from tests.tiny_gguf import write_tiny_gguf

CPU = torch.device("cpu")


def _linear(out: int, inp: int, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_stay_within_half_a_step_of_the_originals(bits):
    layer = _linear(192, 576)
    q = WeightOnlyLinear(layer, bits)
    w = layer.weight.detach()
    error = (q.dense.float() - w).abs()
    if bits == 8:
        step = w.abs().amax(dim=1, keepdim=True) / 127
    else:
        groups = w.view(192, -1, 32)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    # Half a quantization step, plus the bfloat16 rounding of scales, offsets and the copy.
    assert bool((error <= step / 2 + w.abs() * 2**-7 + step * 2**-6).all())
    assert float(error.max()) > 0  # it really is quantized


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, 40])
def test_both_paths_compute_with_the_quantized_weights(bits, rows):
    layer = _linear(256, 512, seed=rows, bias=True)
    q = WeightOnlyLinear(layer, bits)
    x = torch.randn(1, rows, 512).to(torch.bfloat16)
    got = q(x).float()
    want = F.linear(x.float(), q.dense.float(), q.bias.float())
    assert got.shape == (1, rows, 256)
    # bfloat16 output: 8 bits of mantissa over sums of 512 products.
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_the_model_is_transformed_in_place_with_the_head_at_8_bits(demo_model):
    # Loaded in float32 and cast, so that its layers are plain (the loader prepacks bfloat16 ones).
    model = load_model(
        KVCacheConfig(model="demo", device="cpu", dtype="float32", weight_quantization="none")
    ).model.to(torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    counts = quantize_weights(model, "int4")
    assert counts == {"int4": len(linears) - 1, "int8": 1}
    assert not [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = model.get_output_embeddings()
    assert isinstance(head, WeightOnlyLinear) and head.bits == 8


def test_layers_the_int4_kernel_cannot_pack_fall_back_to_int8():
    model = nn.Sequential(_linear(100, 64), _linear(64, 48)).to(torch.bfloat16)  # N % 16, K % 32
    assert quantize_weights(model, "int4") == {"int4": 0, "int8": 2}


def test_only_bfloat16_models_on_the_cpu_are_transformed():
    with pytest.raises(ValueError, match="bfloat16 model on the CPU"):
        quantize_weights(nn.Sequential(_linear(64, 64)), "int4")  # float32
    with pytest.raises(ValueError, match="not one of"):
        quantize_weights(nn.Sequential(_linear(64, 64)).to(torch.bfloat16), "int3")


def test_the_loader_applies_it_and_the_fingerprint_separates_the_weights():
    plain = load_model(
        KVCacheConfig(model="demo", device="cpu", dtype="bfloat16", weight_quantization="none")
    )
    int4 = load_model(KVCacheConfig(model="demo", device="cpu", weight_quantization="int4"))
    int8 = load_model(KVCacheConfig(model="demo", device="cpu", weight_quantization="int8"))
    assert (plain.weight_quantization, int4.weight_quantization, int8.weight_quantization) == (
        "none",
        "int4",
        "int8",
    )
    assert int4.dtype == int8.dtype == torch.bfloat16  # asked for by the quantized kernels
    assert len({plain.fingerprint, int4.fingerprint, int8.fingerprint}) == 3
    assert int4.fingerprint == plain.fingerprint + "+wint4"


async def test_a_quantized_model_serves_many_requests_at_once(monkeypatch):
    """Steps below and above `DENSE_FROM_ROWS` rows take the two paths; every request finishes, and a
    greedy answer alone is the answer it gets alone again."""
    rows_seen: set[int] = set()
    forward = WeightOnlyLinear.forward

    def counting(self, x):
        rows_seen.add(x.numel() // self.in_features)
        return forward(self, x)

    monkeypatch.setattr(WeightOnlyLinear, "forward", counting)
    n = DENSE_FROM_ROWS + 6
    config = KVCacheConfig(
        model="demo", device="cpu", weight_quantization="int4", response_cache=False, max_batch_size=n
    )
    queries = [{"query": f"q{i:02d}", "max_new_tokens": 12, "temperature": 0} for i in range(n)]
    with UltraAdaptiveKVCacheEngine(config) as engine:
        alone = await engine.process_request(queries[0])
        together = await asyncio.gather(*(engine.process_request(q) for q in queries))
        again = await engine.process_request(queries[0])
    assert all(r["completion_tokens"] == 12 for r in together)
    assert again["result"] == alone["result"]
    assert min(rows_seen) < DENSE_FROM_ROWS <= max(rows_seen)  # both paths ran


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"weight_quantization": "int3"}, "weight_quantization"),
        ({"weight_quantization": "int4", "dtype": "float32"}, "weight_quantization"),
        ({"weight_quantization": "int8", "batch_invariant": True}, "weight_quantization"),
    ],
)
def test_bad_combinations_are_configuration_errors(kw, field):
    with pytest.raises(InvalidConfigError) as err:
        KVCacheConfig(model="demo", **kw)
    assert err.value.key == field


def test_auto_follows_the_files_bits_in_bfloat16_on_the_cpu():
    auto = KVCacheConfig(model="demo")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert resolve_weight_quantization(auto, CPU, bf16, 4) == "int4"
    assert resolve_weight_quantization(auto, CPU, bf16, 8) == "int8"
    assert resolve_weight_quantization(auto, CPU, bf16, None) == "none"  # a float file, or not GGUF
    assert resolve_weight_quantization(auto, CPU, fp32, 4) == "none"
    assert resolve_weight_quantization(auto, torch.device("cuda"), bf16, 4) == "none"
    invariant = KVCacheConfig(model="demo", batch_invariant=True)
    assert resolve_weight_quantization(invariant, CPU, bf16, 4) == "none"
    with pytest.raises(ModelLoadError, match="CPU kernels"):
        resolve_weight_quantization(
            KVCacheConfig(model="demo", weight_quantization="int4"), torch.device("cuda"), bf16, None
        )


def test_a_gguf_files_bits_are_recorded_at_conversion_and_drive_auto(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.Q8_0.gguf")
    assert weight_bits(path) == 8
    lm = load_model(
        KVCacheConfig(model=str(path), model_cache_path=str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    )
    assert lm.weight_quantization == "int8"
    folder = next((tmp_path / "m").iterdir())
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["weight_bits"] == 8
    # A folder converted before the manifest recorded the bits gets them added, once.
    del manifest["weight_bits"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert manifest_weight_bits(folder, path) == 8
    assert json.loads((folder / MANIFEST).read_text())["weight_bits"] == 8


@pytest.mark.slow
def test_the_real_models_file_is_4_bit_and_its_int4_model_answers():
    if not registry.is_installed(registry.SMOLLM2_135M):
        pytest.fail(f"the real model's wheel is not installed: {registry.SMOLLM2_135M.install_hint}")
    assert weight_bits(registry.named_model_file("smollm2-135m")) == 4
    config = KVCacheConfig(model="smollm2-135m", device="cpu", dtype="bfloat16", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config) as engine:
        assert engine.model.weight_quantization == "int4"
        answer = engine.process_request_sync(
            {"query": "What is the capital of France?", "max_new_tokens": 16}
        )
    assert "Paris" in answer["result"]


def test_the_transform_is_not_applied_to_a_float32_model(real_model):
    assert real_model.weight_quantization == "none"
    assert weight_quant.WeightOnlyLinear not in {type(m) for m in real_model.model.modules()}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, DENSE_FROM_ROWS])
def test_fused_layers_compute_their_parts_bit_for_bit_and_share_their_weights(bits, rows):
    parts = [
        WeightOnlyLinear(_linear(out, 576, seed=out).to(torch.bfloat16), bits) for out in (576, 192, 192)
    ]
    x = torch.randn(1, rows, 576).to(torch.bfloat16)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = weight_quant.fuse(parts)
    assert fused is not None and fused.out_features == 960
    assert torch.equal(fused(x), separate)
    # The parts now read the fused weights (no second copy) and still compute what they did.
    assert parts[1].qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
    assert parts[1].dense.untyped_storage().data_ptr() == fused.dense.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), separate)


def test_layers_of_different_bits_or_inputs_are_not_fused():
    a = WeightOnlyLinear(_linear(64, 64).to(torch.bfloat16), 4)
    assert weight_quant.fuse([a, WeightOnlyLinear(_linear(64, 64).to(torch.bfloat16), 8)]) is None
    assert weight_quant.fuse([a, WeightOnlyLinear(_linear(64, 128).to(torch.bfloat16), 4)]) is None
    assert weight_quant.fuse([a]) is None


# torch's int4 layout packs 64 outputs together: parts side by side are the fused layer's only where
# every part but the last is a multiple of 64 outputs (a tiny model's 32-output k/v projections are
# not, and stay apart); whatever `fuse` fuses computes its parts' bits.
@pytest.mark.parametrize(
    ("outs", "fusable"),
    [
        ((64, 32, 32), False),
        ((32, 64), False),
        ((96, 96), False),
        ((64, 64, 32), True),
        ((128, 64, 96), True),
    ],
)
def test_int4_parts_fuse_only_where_the_packed_blocks_line_up(outs, fusable):
    parts = [WeightOnlyLinear(_linear(out, 64, seed=i).to(torch.bfloat16), 4) for i, out in enumerate(outs)]
    x = torch.randn(3, 64).to(torch.bfloat16)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = weight_quant.fuse(parts)
    assert (fused is not None) is fusable
    if fused is not None:
        assert torch.equal(fused(x), separate)
    fused8 = weight_quant.fuse(
        [WeightOnlyLinear(_linear(out, 64, seed=i).to(torch.bfloat16), 8) for i, out in enumerate(outs)]
    )
    assert fused8 is not None  # 8-bit rows are packed one by one


def test_a_float32_dense_copy_multiplies_many_rows_in_float32():
    """Where the CPU has no bfloat16 instructions the loader keeps the dense copy in float32: many
    rows are multiplied in float32 and come back in bfloat16; few rows still take the kernel."""
    layer = _linear(256, 512, bias=True).to(torch.bfloat16)
    q32 = WeightOnlyLinear(layer, 4, dense_dtype=torch.float32)
    q16 = WeightOnlyLinear(layer, 4)
    assert q32.dense.dtype == torch.float32 and torch.equal(q32.dense.to(torch.bfloat16), q16.dense)
    x = torch.randn(1, DENSE_FROM_ROWS, 512).to(torch.bfloat16)
    got = q32(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x.float(), q32.dense, q32.bias.float()).to(torch.bfloat16))
    few = x[0, : DENSE_FROM_ROWS - 1]  # few rows: the kernel's, as with a bfloat16 copy
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(few, q32.qweight, q32.group_size, q32.scales)
    assert torch.equal(q32(few), kernel + q32.bias)


def test_auto_runs_a_quantized_file_in_bfloat16_on_an_avx2_cpu(monkeypatch):
    from bulk.models import loader

    monkeypatch.setattr(loader, "has_bf16_instructions", lambda: False)
    monkeypatch.setattr(loader, "has_avx2", lambda: True)
    assert loader.resolve_dtype("auto", CPU, quantized_weights=True) == torch.bfloat16
    assert loader.resolve_dtype("auto", CPU) == torch.float32  # a float model stays float32 there
    assert loader.resolve_dtype("float32", CPU, quantized_weights=True) == torch.float32
    monkeypatch.setattr(loader, "has_avx2", lambda: False)
    assert loader.resolve_dtype("auto", CPU, quantized_weights=True) == torch.float32


def _two_layer_model(bits_of_second: int = 4) -> nn.Module:
    model = nn.Sequential(_linear(128, 64, seed=1), _linear(64, 128, seed=2)).to(torch.bfloat16)
    quantize_weights(model, "int4")
    if bits_of_second == 8:
        model[1] = WeightOnlyLinear(_linear(64, 128, seed=2).to(torch.bfloat16), 8)
    return model


def test_the_dense_split_is_measured_per_bit_width_without_packing_the_layers():
    model = _two_layer_model(bits_of_second=8)
    for bits in (4, 8):
        rows = weight_quant.measure_dense_from_rows(model, bits)
        assert rows in (4, 8, 12, 16, 20, DENSE_FROM_ROWS)
    assert all(layer._packed is None for layer in model)  # the timing's packed copies are dropped
    weight_quant.set_dense_from_rows(model, 6, bits=8)
    assert [layer.dense_from_rows for layer in model] == [DENSE_FROM_ROWS, 6]
    assert weight_quant.dense_shapes(model, 4) == [(64, 128)] and weight_quant.dense_shapes(model, 8) == [
        (128, 64)
    ]


def test_the_row_splits_are_remembered_per_machine(tmp_path, monkeypatch):
    """Measured once; later loads on this machine split where it did (the paths differ in the last
    bits), read from a JSON file; a file that cannot be read is measured around."""
    from bulk.models import loader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(loader, "measure_dense_from_rows", lambda model, bits: calls.append(bits) or 12)
    monkeypatch.setattr(loader, "measure_tiles_from_rows", lambda model, bits: 3)
    model = _two_layer_model()
    assert loader._row_splits(model, 4) == (3, 12) and loader._row_splits(model, 4) == (3, 12)
    assert calls == [4]
    remembered = json.loads((tmp_path / "bul" / "row_splits.json").read_text())
    assert list(remembered.values()) == [[3, 12]]
    # no 8-bit layer: nothing to time
    assert loader._row_splits(model, 8) == (weight_quant.TILES_FROM_ROWS, DENSE_FROM_ROWS)
    (tmp_path / "bul" / "row_splits.json").write_text("not json")
    assert loader._row_splits(model, 4) == (3, 12) and calls == [4, 4]


def test_a_prepacked_dense_copy_multiplies_as_f_linear_does():
    layer = WeightOnlyLinear(_linear(256, 128, seed=3).to(torch.bfloat16), 4)
    layer.dense_from_rows = 1
    for rows in (1, 16, 300):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.dense))
    if weight_quant._onednn_bf16():
        assert layer._packed is not None and layer._packed.is_mkldnn


# ---- the tile kernel (`csrc/tile_linear.cpp`): AMX CPUs only -------------------------------------

needs_tiles = pytest.mark.skipif(
    native.tile_linear() is None, reason="this CPU (or its build) has no AMX tiles"
)


@needs_tiles
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 40])
def test_the_tile_kernel_multiplies_with_the_dense_copys_values(bits, rows):
    """Its weights are the dense copy's bfloat16 values exactly, its sums float32: the product is the
    float32 product of x and the dense copy, rounded once to bfloat16 (bias added before rounding)."""
    layer = WeightOnlyLinear(_linear(256, 512, seed=rows, bias=True).to(torch.bfloat16), bits, tiles=True)
    assert layer.tiles is not None
    layer.tiles_from_rows = 1
    x = torch.randn(rows, 512).to(torch.bfloat16)
    got = layer(x).float()
    want = F.linear(x.float(), layer.dense.float(), layer.bias.float())
    # One bfloat16 rounding of the float32 result (half an ulp: 2^-9 relative), plus sums in
    # another order.
    assert bool(((got - want).abs() <= want.abs() * 2**-8 + 1e-4 * float(want.abs().max())).all())


@needs_tiles
def test_a_rows_tile_product_is_the_same_bits_in_any_batch():
    layer = WeightOnlyLinear(_linear(3072, 576, seed=5).to(torch.bfloat16), 4, tiles=True)
    layer.tiles_from_rows = 1
    x = torch.randn(40, 576).to(torch.bfloat16)
    alone = layer(x[7:8])
    for rows in (2, 13, 16, 33, 40):
        assert torch.equal(layer(x[:rows])[7:8] if rows > 7 else layer(x[6:8])[1:], alone)


@needs_tiles
@pytest.mark.parametrize("bits", [8, 4])
def test_a_fused_layers_tiles_are_its_parts_tiles(bits):
    parts = [
        WeightOnlyLinear(_linear(out, 576, seed=out).to(torch.bfloat16), bits, tiles=True)
        for out in (576, 192, 192)
    ]
    fused = weight_quant.fuse(parts)
    assert fused is not None and fused.tiles is not None
    for layer in (*parts, fused):
        layer.tiles_from_rows = 1
    x = torch.randn(9, 576).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_tiles_are_kept_only_where_asked_and_where_they_fit():
    assert WeightOnlyLinear(_linear(256, 512).to(torch.bfloat16), 4).tiles is None  # not asked
    odd = WeightOnlyLinear(_linear(100, 64).to(torch.bfloat16), 8, tiles=True)
    assert odd.tiles is None  # 100 outputs are not 16-output blocks
    on_float32 = WeightOnlyLinear(
        _linear(256, 512).to(torch.bfloat16), 4, dense_dtype=torch.float32, tiles=True
    )
    assert on_float32.tiles is None  # a float32 dense copy (no bfloat16 instructions): no tiles


@needs_tiles
def test_the_loader_lays_the_weights_out_in_tiles_unless_native_code_is_off():
    def tiled(native_decode: bool) -> list[bool]:
        config = KVCacheConfig(
            model="demo",
            device="cpu",
            dtype="bfloat16",
            weight_quantization="int4",
            native_decode=native_decode,
        )
        model = load_model(config).model
        layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
        # every layer whose shape tiles (the byte vocabulary's head does not: 16-output blocks)
        return [m.tiles is not None for m in layers if weight_quant.tiles_fit(m.in_features, m.out_features)]

    assert len(tiled(True)) > 1 and all(tiled(True)) and not any(tiled(False))

"""The decode step's native code (`bulk.models.native`): built on this machine; the decode
attention (`csrc/decode_attention.cpp`) computing SDPA's attention for every row at once, a row's
bits independent of its batch; the layers (`csrc/decode_layers.cpp`) taken for decode rows of a
quantized Llama model, bit-identical to the Python loop and to transformers' forward over the same
attention; and both left aside (the Python loop, SDPA per row) where they cannot run."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import batched_attention, llama_step, native, weight_quant
from bulk.models.batched_attention import Segment
from bulk.models.loader import load_model


def _quantized(dtype: str = "auto", weights: str = "int4"):
    model = load_model(
        KVCacheConfig(model="demo", device="cpu", dtype=dtype, weight_quantization=weights)
    ).model
    assert batched_attention.enable(model) is None
    return model


def _decode(
    step, model, native_on: bool, rows: list[Segment], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Prefill each row's cached tokens, then one decode step over all rows, on a fresh pool."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    pool = torch.zeros(
        config.num_hidden_layers,
        2,
        config.num_key_value_heads,
        256,
        head_dim,
        dtype=dtype or batched_attention.pool_dtype(param.dtype, param.device),
    )
    attention = native.decode_attention()
    gen = torch.Generator().manual_seed(4)
    for seg in rows:
        ids = torch.randint(0, config.vocab_size, (seg.cached,), generator=gen).tolist()
        step.forward(
            ids, batched_attention.step_batch(pool, [Segment(seg.start, 0, seg.cached)]), [seg.cached - 1]
        )
    saved = step.native
    step.native = saved if native_on else None
    try:
        batch = batched_attention.step_batch(pool, rows, attention, 0)
        tokens = torch.randint(0, config.vocab_size, (len(rows),), generator=gen).tolist()
        return step.forward(tokens, batch, list(range(len(rows))))
    finally:
        step.native = saved


def test_the_native_code_builds_on_this_machine():
    assert native.decode_layers() is not None and native.decode_attention() is not None


# Quantized weights run in bfloat16: the rotary embedding and the pool write fused in C++, rounded
# as ATen rounds, equal the Python loop's operations bit for bit.
@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("pool", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tiles", [False, True])
def test_decode_rows_of_a_quantized_model_run_natively_and_bit_identically(weights, pool, tiles):
    model = _quantized("bfloat16", weights)
    if tiles:  # every decode row through the tile kernel (`csrc/tile_linear.cpp`), where the CPU has one
        if native.tile_linear() is None:
            pytest.skip("this CPU (or its build) has no AMX tiles")
        layers = [
            m
            for layer in model.model.layers
            for m in layer.modules()
            if isinstance(m, weight_quant.WeightOnlyLinear)
        ]
        assert layers and all(m.tiles is not None for m in layers)  # every projection of every layer
        weight_quant.set_tiles_from_rows(model, 1)
    else:
        weight_quant.set_tiles_from_rows(model, weight_quant.TILES_DENSE_FROM_MAX)
    step, why = llama_step.build(model)  # the check against transformers includes a native step
    assert why is None and step is not None and step.native is not None
    calls: list[int] = []
    call = step.native.call
    object.__setattr__(step.native, "call", lambda *a: calls.append(1) or call(*a))
    rows = [Segment(0, 9, 1), Segment(64, 30, 1), Segment(128, 2, 1)]
    ours = _decode(step, model, True, rows, pool)
    assert len(calls) == 1  # the prefills above went through Python; the decode step natively
    python = _decode(step, model, False, rows, pool)
    assert ours.shape == (3, model.config.vocab_size)
    assert torch.equal(ours, python)


def _family(family: str, weights: str = "int8"):
    """A tiny model of `family` in bfloat16, with int8 or int4 weights or its own (`weights`):
    "qwen2" (q/k/v biases), "qwen3" (q/k head norms), "phi3" (its own fused projections),
    "smollm3" (a layer without rotary), the sliding Mistral and Qwen2 (window 8), Gemma 2
    (sandwich norms, GELU-tanh, soft-capped scores, window 8 on alternate layers) and Gemma 3
    (q/k norms after the transpose, a rotary embedding per layer type), their norms' weights
    randomised so that `1 + weight` changes something."""
    from tests.tiny_hf_model import llama_layout_model, sliding_family_model

    name, _, sliding = family.partition("-")
    loaded = sliding_family_model(name) if sliding or name.startswith("gemma") else llama_layout_model(name)
    model = loaded.model
    low = -0.5 if name.startswith("gemma") else 0.5  # Gemma's weights are offsets from one
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(low, low + 1.0)
    model = model.to(torch.bfloat16)
    if weights != "none":
        weight_quant.quantize_weights(model, weights, torch.bfloat16)
    assert batched_attention.enable(model) is None
    return model


# Every family the step runs takes the native layers for its decode rows: one loop over a small
# description of each layer (`NativeLayer`), bit for bit the Python loop's, rows past the window.
@pytest.mark.parametrize(
    "family", ["qwen2", "qwen3", "phi3", "smollm3", "mistral-sliding", "qwen2-sliding", "gemma2", "gemma3"]
)
@pytest.mark.parametrize("weights", ["int8", "int4", "none"])
def test_every_familys_decode_rows_run_natively_and_bit_identically(family, weights):
    model = _family(family, weights)
    step, why = llama_step.build(model)  # the check against transformers includes a native step
    assert why is None and step is not None and step.native is not None
    layers = step.native.layer_shapes
    windows, rotary = layers[1::2], layers[0::2]
    if family.endswith("sliding") or family.startswith("gemma"):
        assert 8 in windows and step.native.family.activation == (
            "gelu_pytorch_tanh" if family.startswith("gemma") else "silu"
        )
    if family == "smollm3":
        assert rotary == [0, -1]  # its second layer without rotary
    if family == "gemma3":
        assert rotary == [0, 1] and step.native.family.head_norms_after_transpose  # local, global
    if family == "gemma2":
        assert step.native.family.softcap == 50.0 and step.native.family.one_plus_norms
    calls: list[int] = []
    call = step.native.call
    object.__setattr__(step.native, "call", lambda *a: calls.append(1) or call(*a))
    rows = [Segment(0, 9, 1), Segment(64, 30, 1), Segment(128, 2, 1)]
    for pool in (torch.bfloat16, torch.float32):
        ours = _decode(step, model, True, rows, pool)
        python = _decode(step, model, False, rows, pool)
        assert torch.equal(ours, python)
    assert len(calls) == 2


# An unquantized model's decode rows take the native layers too, each projection through its own
# weight as its forward multiplies it (q, k and v apart, as transformers computes them): float32
# plain, bfloat16 prepacked for oneDNN as the loader leaves it.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unquantized_decode_rows_run_natively_and_bit_identically(dtype):
    model = load_model(KVCacheConfig(model="demo", device="cpu", dtype=dtype)).model
    assert batched_attention.enable(model) is None
    step, why = llama_step.build(model)  # the check against transformers includes a native step
    assert why is None and step is not None and step.native is not None
    assert all(d.numel() > 0 for d in step.native.dense[:3])  # q, k and v apart
    rows = [Segment(0, 9, 1), Segment(64, 30, 1), Segment(128, 2, 1)]
    ours = _decode(step, model, True, rows)
    assert torch.equal(ours, _decode(step, model, False, rows))


def test_prompt_chunks_keep_the_python_loop():
    model = _quantized()
    step, _ = llama_step.build(model)
    assert step is not None and step.native is not None
    pool = torch.zeros(1, 1, 1, 8, 1)
    attention = native.decode_attention()
    rows = [Segment(0, 2, 1), Segment(4, 0, 1)]
    assert step.native.takes(batched_attention.step_batch(pool, rows, attention, 0), 2)
    # The same one-token segments as prompts (every other token of theirs cached): SDPA's.
    assert not step.native.takes(batched_attention.step_batch(pool, rows, attention), 2)
    assert not step.native.takes(batched_attention.step_batch(pool, [Segment(0, 2, 3)]), 3)  # a chunk
    assert not step.native.takes(
        batched_attention.step_batch(pool, [Segment(0, 2, 1)], attention, 0), 4
    )  # padded


def test_switched_off_or_unbuildable_the_python_loop_decodes(monkeypatch, caplog):
    model = _quantized()
    step, why = llama_step.build(model, native=False)  # the `native_decode` setting off
    assert why is None and step is not None and step.native is None
    native.library.cache_clear()
    try:

        def no_compiler() -> None:
            raise RuntimeError("no C++ compiler")

        monkeypatch.setattr(native, "_loaded", lambda name: None)  # as in a process that never built it
        monkeypatch.setattr(native, "_build_and_load", no_compiler)
        with caplog.at_level(logging.WARNING, logger="bulk.models.native"):
            assert native.decode_layers() is None and native.decode_attention() is None
        assert "no C++ compiler" in caplog.text
        step, why = llama_step.build(model)
        assert why is None and step is not None and step.native is None
    finally:
        native.library.cache_clear()


def test_native_layers_that_differ_are_dropped_for_the_python_loop(monkeypatch, caplog):
    """The check at build runs a step of decode rows natively: layers computing otherwise (here a
    stand-in that skips every layer) are set aside, and the Python loop, which passes, decodes."""
    model = _quantized()
    monkeypatch.setattr(llama_step, "_checked", {})
    monkeypatch.setattr(native, "decode_layers", lambda: lambda hidden, *rest: hidden)
    with caplog.at_level(logging.WARNING, logger="bulk.models.llama_step"):
        step, why = llama_step.build(model, checked_as="demo-int4")
    assert why is None and step is not None and step.native is None
    assert "native decode layers rejected" in caplog.text


def test_the_engine_answers_the_same_with_or_without_the_native_layers(monkeypatch):
    """The native layers compute the Python loop's bits: an engine answers the same with them as
    with the Python loop over the same decode attention. The `native_decode` setting off also drops
    the native decode attention for SDPA, which sums in another order: the first token (the prompt's,
    SDPA in both) is the same, and every answer runs to its length."""
    lm = load_model(KVCacheConfig(model="demo", device="cpu", weight_quantization="int4"))
    config = KVCacheConfig(
        model="demo", weight_quantization="int4", response_cache=False, default_max_new_tokens=16
    )
    queries = ("the first of two prompts", "another prompt, decoded beside nothing")
    real_layers = native.decode_layers

    def answers(config: KVCacheConfig) -> list[str]:
        with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
            runner = engine._ensure_loop().runner
            layers = runner.plain_step.native is not None
            assert layers is (config.native_decode and native.decode_layers is real_layers)
            assert (runner.decode_attention is not None) is config.native_decode
            return [engine.process_request_sync({"query": q, "temperature": 0})["result"] for q in queries]

    with_layers = answers(config)
    monkeypatch.setattr(llama_step, "_checked", {})
    monkeypatch.setattr(native, "decode_layers", lambda: None)  # the Python loop, the same attention
    assert answers(config) == with_layers and all(with_layers)
    monkeypatch.setattr(native, "decode_layers", real_layers)
    off = answers(dataclasses.replace(config, native_decode=False))
    assert [a[0] for a in off] == [a[0] for a in with_layers]
    assert [len(a) for a in off] == [len(a) for a in with_layers]


def _sdpa_rows(query, layer, starts, ends, scaling, float32):
    """The Python loop's calls (`batched_attention.attend`), one row at a time."""
    work = torch.float32 if float32 else query.dtype
    rows = []
    for r, (start, end) in enumerate(zip(starts, ends, strict=True)):
        k = layer[0, :, start:end].unsqueeze(0).to(work)
        v = layer[1, :, start:end].unsqueeze(0).to(work)
        q = query[:, :, r : r + 1].to(work)
        gqa = q.shape[1] != k.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        rows.append(out.transpose(1, 2).to(query.dtype))
    return torch.cat(rows, 1)  # (1, rows, heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("lengths", "heads", "head_dim"),
    [
        ([1], (4, 4), 64),  # one key; no grouping
        ([3000], (9, 3), 64),  # one long row: slices of its keys over the threads, merged
        ([5, 700, 64, 1, 250, 257], (9, 3), 64),  # rows of every length, SmolLM2's grouping
        ([40] * 24, (8, 2), 128),
        ([33, 300], (14, 2), 64),  # Qwen2.5-0.5B's grouping
    ],
)
def test_the_decode_attention_computes_what_sdpa_computes_for_every_row(dtype, lengths, heads, head_dim):
    """One call for all rows, placed anywhere in the pool: each row's output is SDPA's over its own
    range (float32 arithmetic whatever the pool holds), up to the order of summation."""
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(len(lengths))
    starts = [17 + 3100 * i for i in range(len(lengths))]
    ends = [start + n for start, n in zip(starts, lengths, strict=True)]
    layer = torch.randn(2, kv_heads, ends[-1] + 5, head_dim, generator=generator).to(dtype)
    query = torch.randn(1, q_heads, len(lengths), head_dim, generator=generator).to(dtype)
    assert native.has_decode_kernel(_Model(dtype, head_dim, q_heads, kv_heads))
    out = native.decode_attention()(query, layer, starts, ends, head_dim**-0.5, False)
    assert out.shape == (1, len(lengths), q_heads, head_dim) and out.dtype == dtype
    expected = _sdpa_rows(query.float(), layer.float(), starts, ends, head_dim**-0.5, True)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    assert (out.float() - expected).abs().max().item() < tolerance


def test_a_rows_attention_is_the_same_bits_in_any_batch():
    generator = torch.Generator().manual_seed(3)
    layer = torch.randn(2, 3, 8000, 64, generator=generator).to(torch.bfloat16)
    query = torch.randn(1, 9, 6, 64, generator=generator).to(torch.bfloat16)
    starts, ends = [0, 1000, 2000, 3000, 4000, 5000], [700, 1003, 2999, 3257, 4001, 5600]
    attend = native.decode_attention()
    together = attend(query, layer, starts, ends, 0.125, False)
    for r in range(6):
        alone = attend(query[:, :, r : r + 1], layer, starts[r : r + 1], ends[r : r + 1], 0.125, False)
        assert torch.equal(alone[0, 0], together[0, r])


@pytest.mark.parametrize(
    ("dtype", "head_dim", "heads"), [(torch.float16, 64, (9, 3)), (torch.float32, 40, (4, 2))]
)
def test_shapes_without_a_kernel_take_sdpa_per_row(dtype, head_dim, heads):
    """A half-precision pool, a head size the kernel has no version for: SDPA, the Python loop's
    calls, bit for bit."""
    q_heads, kv_heads = heads
    assert not native.has_decode_kernel(_Model(dtype, head_dim, q_heads, kv_heads))
    generator = torch.Generator().manual_seed(5)
    layer = torch.randn(2, kv_heads, 3000, head_dim, generator=generator).to(dtype)
    query = torch.randn(1, q_heads, 3, head_dim, generator=generator).to(dtype)
    starts, ends = [0, 1000, 2000], [10, 1700, 2003]
    for float32 in (False, True):
        out = native.decode_attention()(query, layer, starts, ends, 0.125, float32)
        assert torch.equal(out, _sdpa_rows(query, layer, starts, ends, 0.125, float32))


class _Model:
    """What `native.has_decode_kernel` reads of a model: its config and its parameters' dtype."""

    def __init__(self, dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int) -> None:
        self.config = SimpleNamespace(
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=heads * head_dim,
        )
        self._param = torch.zeros(1, dtype=dtype)

    def parameters(self):
        return iter([self._param])


def test_the_decode_attention_refuses_what_it_cannot_read():
    attend = native.decode_attention()
    layer = torch.zeros(2, 3, 32, 64)
    query = torch.zeros(1, 9, 1, 64)
    with pytest.raises(RuntimeError, match="outside the pool"):
        attend(query, layer, [30], [40], 0.125, False)
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        attend(torch.zeros(1, 8, 1, 64), layer, [0], [4], 0.125, False)
    with pytest.raises(RuntimeError, match="one KV range per row"):
        attend(query, layer, [0, 4], [4, 8], 0.125, False)


def test_a_batched_step_sends_its_decode_rows_to_it_in_one_call():
    """A step mixing a prompt chunk and decode rows: the chunk through SDPA, the rows at the end in
    one decode attention call; the logits are those of the rows run alone, and those of the same
    step through SDPA, up to the order of summation."""
    lm = load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32"))
    model = lm.model
    assert batched_attention.enable(model) is None
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    pool = torch.zeros(config.num_hidden_layers, 2, config.num_key_value_heads, 512, head_dim)
    calls: list[int] = []
    attention = native.decode_attention()

    def counted(query, layer, starts, ends, scaling, float32, softcap):
        calls.append(len(starts))
        return attention(query, layer, starts, ends, scaling, float32, softcap)

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (20, 33, 7)]
    for start, ids in zip((0, 128, 256), prompts, strict=True):
        batched_attention.forward_step(
            model, ids, batched_attention.step_batch(pool, [Segment(start, 0, len(ids))]), [0]
        )
    chunk = torch.randint(0, config.vocab_size, (12,), generator=gen).tolist()
    rows = [Segment(128, 33, 1), Segment(256, 7, 1)]
    segments = [Segment(384, 0, 12), *rows]
    batch = batched_attention.step_batch(pool, segments, counted, 1)
    assert batch.rows_from == 1 and batch.row_starts == [128, 256] and batch.row_ends == [162, 264]
    tokens = [*chunk, 5, 9]
    mixed = batched_attention.forward_step(model, tokens, batch, [11, 12, 13])
    assert calls == [2] * config.num_hidden_layers  # every layer: both rows in one call
    sdpa = batched_attention.forward_step(
        model, tokens, batched_attention.step_batch(pool, segments), [11, 12, 13]
    )
    assert torch.allclose(mixed, sdpa, atol=1e-4)  # SDPA per row: the same up to summation order
    for i, (row, token) in enumerate(zip(rows, (5, 9), strict=True)):
        alone = batched_attention.forward_step(
            model, [token], batched_attention.step_batch(pool, [row], attention, 0), [0]
        )
        assert torch.allclose(mixed[1 + i], alone[0], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_argmax_chooses_what_torch_argmax_chooses(dtype):
    argmax = native.argmax_rows()
    assert argmax is not None
    generator = torch.Generator().manual_seed(3)
    for vocab in (49152, 1000, 7):  # whole vectors, and a tail after them
        logits = torch.randn(6, vocab, generator=generator).to(dtype)
        logits[1, : min(vocab, 5)] = 40.0  # ties: the first of them
        logits[2, vocab // 2] = float("nan")  # a NaN wins, the first one
        logits[2, vocab - 1] = float("nan")
        logits[3] = float("-inf")  # all -inf: index 0
        logits[4, vocab - 1] = 1e4  # the largest in the tail
        assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    strided = torch.randn(4, 64, generator=generator)[:, ::2]  # not contiguous: torch's own
    assert torch.equal(argmax(strided), strided.argmax(dim=-1))


def test_a_compiler_without_openmp_builds_the_same_code_for_one_thread(monkeypatch, caplog):
    calls: list[bool] = []

    def build(openmp: bool) -> None:
        calls.append(openmp)
        if openmp:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")

    monkeypatch.setattr(native, "_build_and_load_with", build)
    with caplog.at_level(logging.WARNING, logger="bulk.models.native"):
        native._build_and_load()
    assert calls == [True, False]
    assert "without OpenMP" in caplog.text and "-fopenmp" in caplog.text


def test_a_quantized_qwen2_decodes_natively_with_its_biases_bit_identically():
    """Qwen2's q/k/v biases: the native layers add them as `WeightOnlyLinear` does, on the quantized
    kernel's path and on the dense copy's; checked against transformers at build and against the
    Python loop here."""
    from bulk.models import weight_quant
    from tests.tiny_hf_model import llama_layout_model

    rows = [Segment(0, 9, 1), Segment(64, 30, 1), Segment(128, 2, 1)]
    for dense_from_rows in (64, 1):  # the quantized kernels, then the dense copies
        model = llama_layout_model("qwen2").model.to(torch.bfloat16)
        weight_quant.quantize_weights(model, "int8")
        weight_quant.set_dense_from_rows(model, dense_from_rows)
        assert batched_attention.enable(model) is None
        step, why = llama_step.build(model)
        assert why is None and step is not None and step.native is not None
        assert any(b is not None for b in step.native.biases)
        ours = _decode(step, model, True, rows, torch.bfloat16)
        python = _decode(step, model, False, rows, torch.bfloat16)
        assert torch.equal(ours, python)


# ---- the prompt attention (`csrc/prompt_attention.cpp`): AMX CPUs only ---------------------------

needs_tiles = pytest.mark.skipif(
    native.prompt_attention() is None, reason="this CPU (or its build) has neither AMX tiles nor AVX512-BF16"
)


def _reference_attention(q, layer, first, end, position, window, scaling):
    """float32 SDPA over the same keys with the same causal (and sliding) mask, (1, L, heads, dim)."""
    length = q.shape[2]
    keys, queries = torch.arange(first, end), position + torch.arange(length)
    mask = keys[None, :] <= queries[:, None]
    if window:
        mask &= keys[None, :] > queries[:, None] - window
    k, v = layer[0, :, first:end].unsqueeze(0).float(), layer[1, :, first:end].unsqueeze(0).float()
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k, v, attn_mask=mask[None, None], enable_gqa=True, scale=scaling
    )
    return out.transpose(1, 2)


# (heads, key heads, head size, chunk, cached before it, window)
PROMPT_SHAPES = [
    (9, 3, 64, 190, 16, 0),  # SmolLM2's heads, a chat question after a cached template header
    (9, 3, 64, 33, 0, 0),
    (4, 2, 128, 70, 300, 0),
    (9, 3, 64, 200, 1000, 0),
    (8, 8, 64, 50, 40, 16),  # a sliding window of 16 keys
    (9, 3, 64, 1, 77, 0),  # a prompt's last token alone (the rest of it cached)
]


@needs_tiles
@pytest.mark.parametrize("heads,kv_heads,dim,length,cached,window", PROMPT_SHAPES)
def test_the_prompt_attention_computes_what_sdpa_computes(heads, kv_heads, dim, length, cached, window):
    torch.manual_seed(length)
    start = 37
    layer = torch.randn(2, kv_heads, start + cached + length + 20, dim).to(torch.bfloat16)
    q = torch.randn(1, heads, length, dim).to(torch.bfloat16)
    first, end, position = start, start + cached + length, start + cached
    if window and cached + length > window:
        first += max(0, cached - window + 1)  # as `attend` leaves out keys no query sees
    got = native.prompt_attention()(q, layer, first, end, position, window, dim**-0.5)
    want = _reference_attention(q, layer, first, end, position, window, dim**-0.5)
    assert got.shape == (1, length, heads, dim) and got.dtype == torch.bfloat16
    # bfloat16 inputs, probabilities and output: a few 2^-9 of the largest value.
    assert float((got.float() - want).abs().max()) <= 8 * 2**-9 * float(want.abs().max())


@needs_tiles
def test_a_querys_prompt_attention_is_the_same_bits_in_a_chunk_or_alone():
    """So that a prompt whose prefix is cached computes its last tokens as the whole prompt did."""
    torch.manual_seed(3)
    layer = torch.randn(2, 3, 400, 64).to(torch.bfloat16)
    q = torch.randn(1, 9, 120, 64).to(torch.bfloat16)
    attention = native.prompt_attention()
    whole = attention(q, layer, 0, 150, 30, 0, 0.125)  # 120 queries after 30 cached keys
    for t in (0, 17, 63, 64, 119):
        alone = attention(q[:, :, t : t + 1], layer, 0, 31 + t, 30 + t, 0, 0.125)
        assert torch.equal(alone[0, 0], whole[0, t])
    tail = attention(q[:, :, 100:], layer, 0, 150, 130, 0, 0.125)  # a later chunk of the same prompt
    assert torch.equal(tail, whole[:, 100:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 48])  # 48: no kernel, the eager fallback in C++
def test_soft_capped_decode_rows_compute_what_the_eager_attention_computes(dtype, head_dim):
    """Gemma 2's scores, softcap * tanh(score / softcap), for every row at once."""
    torch.manual_seed(head_dim)
    heads, kv_heads, softcap = 8, 4, 5.0
    layer = torch.randn(2, kv_heads, 300, head_dim).to(dtype)
    query = (3 * torch.randn(1, heads, 3, head_dim)).to(dtype)  # large scores: the cap matters
    starts, ends = [0, 40, 100], [17, 290, 101]
    out = native.decode_attention()(query, layer, starts, ends, head_dim**-0.5, False, softcap)
    for r, (start, end) in enumerate(zip(starts, ends, strict=True)):
        k = layer[0, :, start:end].float().repeat_interleave(heads // kv_heads, 0)
        v = layer[1, :, start:end].float().repeat_interleave(heads // kv_heads, 0)
        scores = (query[0, :, r : r + 1].float() @ k.transpose(1, 2)) * head_dim**-0.5
        weights = torch.softmax(torch.tanh(scores / softcap) * softcap, -1)
        want = (weights @ v)[:, 0]  # (heads, head_dim)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out[0, r].float(), want, atol=tolerance, rtol=tolerance)
    uncapped = native.decode_attention()(query, layer, starts, ends, head_dim**-0.5, False)
    assert not torch.allclose(uncapped, out)  # the cap changed something

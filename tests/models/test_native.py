"""The decode step's native code (`bulk.models.native`): built on this machine; the decode
attention (`csrc/decode_attention.cpp`) making every row's SDPA call in one; the layers
(`csrc/llama_decode.cpp`) taken for decode rows of a quantized Llama model; both bit-identical to
the Python loop and to transformers' forward, and left aside (the Python loop, the same bits) where
they cannot run."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import batched_attention, llama_step, native
from bulk.models.batched_attention import Segment
from bulk.models.loader import load_model


def _quantized():
    model = load_model(KVCacheConfig(model="demo", device="cpu", weight_quantization="int4")).model
    assert batched_attention.enable(model) is None
    return model


def _decode(step, model, native_on: bool, rows: list[Segment]) -> torch.Tensor:
    """Prefill each row's cached tokens, then one decode step over all rows, on a fresh pool."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    pool = torch.zeros(
        config.num_hidden_layers,
        2,
        config.num_key_value_heads,
        256,
        head_dim,
        dtype=batched_attention.pool_dtype(param.dtype, param.device),
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
        batch = batched_attention.step_batch(pool, rows, attention)
        tokens = torch.randint(0, config.vocab_size, (len(rows),), generator=gen).tolist()
        return step.forward(tokens, batch, list(range(len(rows))))
    finally:
        step.native = saved


def test_the_native_code_builds_on_this_machine():
    assert native.decode_layers() is not None and native.decode_attention() is not None


def test_decode_rows_of_a_quantized_model_run_natively_and_bit_identically():
    model = _quantized()
    step, why = llama_step.build(model)  # the check against transformers includes a native step
    assert why is None and step is not None and step.native is not None
    calls: list[int] = []
    call = step.native.call
    object.__setattr__(step.native, "call", lambda *a: calls.append(1) or call(*a))
    rows = [Segment(0, 9, 1), Segment(64, 30, 1), Segment(128, 2, 1)]
    ours = _decode(step, model, True, rows)
    assert len(calls) == 1  # the prefills above went through Python; the decode step natively
    python = _decode(step, model, False, rows)
    assert ours.shape == (3, model.config.vocab_size)
    assert torch.equal(ours, python)


def test_prompt_chunks_and_float_models_keep_the_python_loop():
    model = _quantized()
    step, _ = llama_step.build(model)
    assert step is not None and step.native is not None
    pool = torch.zeros(1, 1, 1, 8, 1)
    assert step.native.takes(batched_attention.step_batch(pool, [Segment(0, 2, 1), Segment(4, 0, 1)]), 2)
    assert not step.native.takes(batched_attention.step_batch(pool, [Segment(0, 2, 3)]), 3)  # a chunk
    assert not step.native.takes(batched_attention.step_batch(pool, [Segment(0, 2, 1)]), 4)  # padded
    float_model = load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32")).model
    batched_attention.enable(float_model)
    float_step, _ = llama_step.build(float_model)
    assert float_step is not None and float_step.native is None  # its projections are not quantized


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


def test_the_engine_answers_the_same_either_way():
    """The native layers and the native decode attention compute the Python loop's bits: an engine
    with the `native_decode` setting on answers as one with it off (and as transformers' SDPA
    attention over the same pool)."""
    lm = load_model(KVCacheConfig(model="demo", device="cpu", weight_quantization="int4"))
    config = KVCacheConfig(
        model="demo", weight_quantization="int4", response_cache=False, default_max_new_tokens=16
    )
    answers: dict[bool, list[str]] = {}
    for native_on in (True, False):
        config = dataclasses.replace(config, native_decode=native_on)
        with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
            answers[native_on] = [
                engine.process_request_sync({"query": query, "temperature": 0})["result"]
                for query in ("the first of two prompts", "another prompt, decoded beside nothing")
            ]
            runner = engine._ensure_loop().runner
            assert (runner.plain_step.native is not None) is native_on
            assert (runner.decode_attention is not None) is native_on
    assert answers[True] == answers[False] and all(answers[True])


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


@pytest.mark.parametrize(
    ("dtype", "float32"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
@pytest.mark.parametrize(
    ("lengths", "heads"),
    [
        ([1], (4, 4)),  # one key; no grouping; one row: SDPA splits the heads over the threads
        ([5, 700, 64, 1, 250], (9, 3)),  # rows of every length, SmolLM2's grouping, over the threads
        ([40] * 24, (8, 2)),
    ],
)
def test_the_decode_attention_computes_sdpa_for_every_row(dtype, float32, lengths, heads):
    """One call for all rows, placed anywhere in the pool: each row's output is, bit for bit, the
    SDPA call the Python loop makes for it (in float32 when asked, converting the pool's values)."""
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(len(lengths))
    starts = [17 + 3100 * i for i in range(len(lengths))]
    ends = [start + n for start, n in zip(starts, lengths, strict=True)]
    layer = torch.randn(2, kv_heads, ends[-1] + 5, 64, generator=generator).to(dtype)
    query = torch.randn(1, q_heads, len(lengths), 64, generator=generator).to(dtype)
    out = native.decode_attention()(query, layer, starts, ends, 0.125, float32)
    assert out.shape == (1, len(lengths), q_heads, 64) and out.dtype == dtype
    assert torch.equal(out, _sdpa_rows(query, layer, starts, ends, 0.125, float32))


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
    step without the native call."""
    lm = load_model(KVCacheConfig(model="demo", device="cpu", dtype="float32"))
    model = lm.model
    assert batched_attention.enable(model) is None
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    pool = torch.zeros(config.num_hidden_layers, 2, config.num_key_value_heads, 512, head_dim)
    calls: list[int] = []
    attention = native.decode_attention()

    def counted(query, layer, starts, ends, scaling, float32):
        calls.append(len(starts))
        return attention(query, layer, starts, ends, scaling, float32)

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (20, 33, 7)]
    for start, ids in zip((0, 128, 256), prompts, strict=True):
        batched_attention.forward_step(
            model, ids, batched_attention.step_batch(pool, [Segment(start, 0, len(ids))]), [0]
        )
    chunk = torch.randint(0, config.vocab_size, (12,), generator=gen).tolist()
    rows = [Segment(128, 33, 1), Segment(256, 7, 1)]
    segments = [Segment(384, 0, 12), *rows]
    batch = batched_attention.step_batch(pool, segments, counted)
    assert batch.rows_from == 1 and batch.row_starts == [128, 256] and batch.row_ends == [162, 264]
    tokens = [*chunk, 5, 9]
    mixed = batched_attention.forward_step(model, tokens, batch, [11, 12, 13])
    assert calls == [2] * config.num_hidden_layers  # every layer: both rows in one call
    for i, (row, token) in enumerate(zip(rows, (5, 9), strict=True)):
        alone = batched_attention.forward_step(
            model, [token], batched_attention.step_batch(pool, [row], attention), [0]
        )
        assert torch.allclose(mixed[1 + i], alone[0], atol=1e-4)

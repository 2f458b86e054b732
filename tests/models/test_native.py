"""The decode step's native layers (`bulk.models.native`, `csrc/llama_decode.cpp`): built on this
machine, taken for decode rows of a quantized Llama model, bit-identical to the Python loop and to
transformers' forward, and left aside (the Python loop, the same bits) where they cannot run."""

from __future__ import annotations

import dataclasses
import logging

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
    gen = torch.Generator().manual_seed(4)
    for seg in rows:
        ids = torch.randint(0, config.vocab_size, (seg.cached,), generator=gen).tolist()
        step.forward(
            ids, batched_attention.step_batch(pool, [Segment(seg.start, 0, seg.cached)]), [seg.cached - 1]
        )
    saved = step.native
    step.native = saved if native_on else None
    try:
        batch = batched_attention.step_batch(pool, rows)
        tokens = torch.randint(0, config.vocab_size, (len(rows),), generator=gen).tolist()
        return step.forward(tokens, batch, list(range(len(rows))))
    finally:
        step.native = saved


def test_the_native_layers_build_on_this_machine():
    assert native.decode_layers() is not None


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
    native.decode_layers.cache_clear()
    try:

        def no_compiler() -> None:
            raise RuntimeError("no C++ compiler")

        monkeypatch.setattr(native, "_loaded", lambda: None)  # as in a process that never built it
        monkeypatch.setattr(native, "_build_and_load", no_compiler)
        with caplog.at_level(logging.WARNING, logger="bulk.models.native"):
            assert native.decode_layers() is None
        assert "no C++ compiler" in caplog.text
        step, why = llama_step.build(model)
        assert why is None and step is not None and step.native is None
    finally:
        native.decode_layers.cache_clear()


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


def test_the_engine_answers_the_same_either_way(monkeypatch):
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
            assert (engine._ensure_loop().runner.plain_step.native is not None) is native_on
    assert answers[True] == answers[False] and all(answers[True])

"""bfloat16 on a CPU: `dtype="auto"` picks it only where the CPU has bfloat16 instructions, and the
engine's attention over a bfloat16 KV pool runs in float32 (torch's CPU kernel in bfloat16 is both
slower and less exact)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bulk.config import KVCacheConfig
from bulk.engine import model_runner
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import batched_attention, cpu, kv_pool
from bulk.models.batched_attention import Segment
from bulk.models.loader import load_model, resolve_dtype

INTEL_FLAGS = (
    "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
)
OLD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"


def test_cpuinfo_flags_are_read_from_the_first_processor():
    assert {"avx512_bf16", "amx_bf16"} <= cpu.cpuinfo_flags(INTEL_FLAGS)
    assert not cpu.cpuinfo_flags(OLD_FLAGS) & cpu.BF16_FLAGS
    assert cpu.cpuinfo_flags("Processor\t: AArch64\nFeatures\t: fp asimd bf16\n") is None


def _clear() -> None:
    cpu._flags.cache_clear()
    cpu.has_bf16_instructions.cache_clear()


@pytest.mark.parametrize("text,expected", [(INTEL_FLAGS, True), (OLD_FLAGS, False)])
def test_detection_follows_the_kernels_flags(tmp_path, monkeypatch, text, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    monkeypatch.setattr(cpu, "CPUINFO", info)
    _clear()
    try:
        assert cpu.has_bf16_instructions() is expected
    finally:
        _clear()


def test_without_cpuinfo_torchs_probe_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    _clear()
    try:
        assert cpu.has_bf16_instructions() is bool(cpu._torch_probe())
    finally:
        _clear()


def test_this_machine_agrees_with_torch():
    """/proc/cpuinfo and torch's own probe tell the same story here."""
    if Path("/proc/cpuinfo").is_file():
        assert cpu.has_bf16_instructions() is bool(cpu._torch_probe())


def test_auto_is_bfloat16_exactly_where_the_cpu_has_the_instructions():
    expected = torch.bfloat16 if cpu.has_bf16_instructions() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("half_is_faster", [False, True])
def test_bfloat16_attention_over_the_pool_runs_in_the_faster_precision(monkeypatch, half_is_faster):
    """A decode row and a prompt chunk over a bfloat16 pool. Where bfloat16 SDPA is the slower (as
    `cpu.half_attention_is_faster` measures), each segment's output is float32 attention over the
    stored bfloat16 keys and values, closer to exact than bfloat16 SDPA; where it is the faster, it
    is bfloat16 SDPA's output."""
    monkeypatch.setattr(batched_attention.cpu, "half_attention_is_faster", lambda dtype: half_is_faster)
    gen = torch.Generator().manual_seed(3)
    bf16 = torch.bfloat16
    pool = torch.randn(1, 2, 3, 48, 64, generator=gen).to(bf16)  # (layers, 2, kv_heads, tokens, head_dim)
    segments = [Segment(start=0, cached=20, length=1), Segment(start=24, cached=8, length=4)]
    batch = batched_attention.step_batch(pool, segments)
    query = torch.randn(1, 9, 5, 64, generator=gen).to(bf16)
    key = torch.randn(1, 3, 5, 64, generator=gen).to(bf16)
    value = torch.randn(1, 3, 5, 64, generator=gen).to(bf16)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=3, is_causal=True, training=False)
    out, _ = batched_attention._attention(module, query, key, value, None, bul_step_batch=batch)
    assert out.dtype == bf16 and out.shape == (1, 5, 9, 64)
    offset = 0
    for seg, mask in zip(segments, batch.masks, strict=True):
        end = seg.start + seg.cached + seg.length
        q = query[:, :, offset : offset + seg.length]
        k = pool[0, 0, :, seg.start : end].unsqueeze(0).repeat_interleave(3, dim=1)
        v = pool[0, 1, :, seg.start : end].unsqueeze(0).repeat_interleave(3, dim=1)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        in_fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(bf16)
        in_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = out[:, offset : offset + seg.length].transpose(1, 2)
        if half_is_faster:
            assert torch.equal(got, in_bf16)
        else:
            assert torch.equal(got, in_fp32)
            assert (got.double() - exact).abs().max() <= (in_bf16.double() - exact).abs().max()
        offset += seg.length


def test_the_attention_precision_is_measured_once_per_dtype():
    cpu.half_attention_is_faster.cache_clear()
    first = cpu.half_attention_is_faster(torch.bfloat16)
    assert isinstance(first, bool)
    assert cpu.half_attention_is_faster(torch.bfloat16) is first
    assert cpu.half_attention_is_faster.cache_info().hits == 1


@pytest.mark.parametrize("half_is_faster", [False, True])
def test_the_pool_holds_float32_exactly_where_attention_runs_in_float32(monkeypatch, half_is_faster):
    monkeypatch.setattr(batched_attention.cpu, "half_attention_is_faster", lambda dtype: half_is_faster)
    cpu_device, cuda = torch.device("cpu"), torch.device("cuda")
    expected = torch.bfloat16 if half_is_faster else torch.float32
    assert batched_attention.pool_dtype(torch.bfloat16, cpu_device) == expected
    assert batched_attention.pool_dtype(torch.float32, cpu_device) == torch.float32
    assert batched_attention.pool_dtype(torch.bfloat16, cuda) == torch.bfloat16


def test_a_float32_pool_changes_no_bit_of_bfloat16_attention(monkeypatch):
    """The keys and values written into a float32 pool are the bfloat16 ones exactly, and attention
    over it gives the output it gives over a bfloat16 pool converted at every step."""
    monkeypatch.setattr(batched_attention.cpu, "half_attention_is_faster", lambda dtype: False)
    gen = torch.Generator().manual_seed(5)
    bf16 = torch.bfloat16
    half_pool = torch.randn(1, 2, 3, 48, 64, generator=gen).to(bf16)
    float_pool = half_pool.float()
    segments = [Segment(start=0, cached=20, length=1), Segment(start=24, cached=8, length=4)]
    query = torch.randn(1, 9, 5, 64, generator=gen).to(bf16)
    key = torch.randn(1, 3, 5, 64, generator=gen).to(bf16)
    value = torch.randn(1, 3, 5, 64, generator=gen).to(bf16)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=3, is_causal=True, training=False)
    outs = []
    for pool in (half_pool, float_pool):
        batch = batched_attention.step_batch(pool, segments)
        out, _ = batched_attention._attention(module, query, key, value, None, bul_step_batch=batch)
        outs.append(out)
    assert outs[1].dtype == bf16
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(float_pool, half_pool.float())  # the new keys and values too, exactly


def test_blocks_leave_a_float32_pool_in_the_models_dtype():
    gen = torch.Generator().manual_seed(7)
    blocks = [torch.randn(2, 2, 3, 4, 8, generator=gen).to(torch.bfloat16) for _ in range(3)]
    slot = torch.zeros(2, 2, 3, 16, 8)  # float32: (layers, 2, kv_heads, capacity, head_dim)
    kv_pool.copy_blocks_in(slot, blocks, 12)
    out = kv_pool.blocks_out(slot, 0, 12, 4, torch.bfloat16)
    assert [b.dtype for b in out] == [torch.bfloat16] * 3
    assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(blocks, out, strict=True))
    assert kv_pool.blocks_out(slot, 0, 4, 4)[0].dtype == torch.float32  # the pool's by default


def test_a_bfloat16_engine_answers_the_same_over_either_pool(monkeypatch):
    """End to end: the demo model in bfloat16, float32 attention through SDPA (the path without the
    native decode attention, which reads either pool as it is); the float32 pool gives the logits of
    every token bit for bit as a bfloat16 pool does, and the blocks it stores are bfloat16."""
    monkeypatch.setattr(batched_attention.cpu, "half_attention_is_faster", lambda dtype: False)
    lm = load_model(KVCacheConfig(model="demo", device="cpu", dtype="bfloat16"))
    config = KVCacheConfig(
        model="demo", dtype="bfloat16", response_cache=False, default_max_new_tokens=12, native_decode=False
    )
    query = {"query": "the same prompt, twice over, so that blocks are stored " * 3}
    stored_dtypes: set[torch.dtype] = set()

    def blocks_out(*args):
        blocks = kv_pool.blocks_out(*args)
        stored_dtypes.update(b.dtype for b in blocks)
        return blocks

    monkeypatch.setattr(model_runner, "blocks_out", blocks_out)
    runs = []
    for pool_dtype in (batched_attention.pool_dtype, lambda dtype, device, native=False: dtype):
        monkeypatch.setattr(batched_attention, "pool_dtype", pool_dtype)
        logits: list[torch.Tensor] = []
        observer = lambda seq, row, out=logits: out.append(row.clone())  # noqa: E731
        with UltraAdaptiveKVCacheEngine(config, model=lm, logits_observer=observer) as engine:
            first = engine.process_request_sync(query)
            second = engine.process_request_sync(query)
            runs.append((engine._ensure_loop().runner.pool.dtype, first, second, logits))
        assert second["cached_tokens"] > 0
    assert stored_dtypes == {torch.bfloat16}
    (float_dtype, *float_run, float_logits), (half_dtype, *half_run, half_logits) = runs
    assert (float_dtype, half_dtype) == (torch.float32, torch.bfloat16)
    assert [r["result"] for r in float_run] == [r["result"] for r in half_run]
    assert len(float_logits) == len(half_logits) == 24
    assert all(torch.equal(a, b) for a, b in zip(float_logits, half_logits, strict=True))

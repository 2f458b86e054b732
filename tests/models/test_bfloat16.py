"""bfloat16 on a CPU: `dtype="auto"` picks it only where the CPU has bfloat16 instructions, and the
engine's attention over a bfloat16 KV pool runs in float32 (torch's CPU kernel in bfloat16 is both
slower and less exact)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bulk.models import batched_attention, cpu
from bulk.models.batched_attention import Segment
from bulk.models.loader import resolve_dtype

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

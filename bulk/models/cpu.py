"""What the CPU can do in bfloat16: the choice behind `dtype="auto"` on a CPU.

A CPU with bfloat16 dot-product instructions (x86's AVX512-BF16, or AMX-BF16 tiles) runs torch's
bfloat16 matrix products in hardware; without them torch emulates bfloat16 in float32 code, slower
than float32 itself. So `auto` picks bfloat16 only on CPUs that have them.

Detection, in order:
  1. Linux: the `flags` line of /proc/cpuinfo names `avx512_bf16` or `amx_bf16`. The kernel lists a
     feature only when the CPU has it and the kernel lets programs use it (AMX needs the kernel to
     enable its tile state), which is what counts, inside a VM too.
  2. Elsewhere (no /proc/cpuinfo): torch's own probe of the same two features (cpuinfo, inside
     torch), `torch.cpu._is_avx512_bf16_supported` / `_is_amx_tile_supported`, where torch has them.

Without them, a model whose weights are 4- or 8-bit still runs in bfloat16 where the CPU has AVX2
(`has_avx2`): torch's quantized weight kernels take bfloat16 activations and are vectorised for
AVX2, and decoding reads a quarter of float32's bytes (`bulk.models.weight_quant` keeps the
products of many rows in float32 there).

The ARM `bf16` feature is not taken: the figures behind the choice were measured on AVX512-BF16."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags(text: str) -> frozenset[str] | None:
    """The feature flags of the first processor in /proc/cpuinfo's `text`; None when it lists none
    (not an x86 cpuinfo)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def _torch_probe() -> bool | None:
    import torch

    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    found = [bool(p()) for p in probes if callable(p)]
    return any(found) if found else None


@functools.cache
def _flags() -> frozenset[str] | None:
    try:
        return cpuinfo_flags(CPUINFO.read_text())
    except OSError:
        return None


@functools.cache
def has_bf16_instructions() -> bool:
    """True when this CPU runs bfloat16 dot products in hardware (see the module's docstring)."""
    flags = _flags()
    if flags is not None:
        found = sorted(flags & BF16_FLAGS)
        log.debug("/proc/cpuinfo bfloat16 flags: %s", found or "none")
        return bool(found)
    probed = _torch_probe()
    log.debug("torch's bfloat16 probe: %s", probed)
    return bool(probed)


def flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none): what a library
    built for this machine's instruction set depends on."""
    return _flags() or frozenset()


def has_avx2() -> bool:
    """True when /proc/cpuinfo lists AVX2 (x86 only; False where there is no /proc/cpuinfo)."""
    flags = _flags()
    return flags is not None and "avx2" in flags


# A half-precision attention is taken only when it beats float32 by this margin, so that a machine
# where the two are close does not flip between them from one process to the next (their outputs
# differ in the last bits).
HALF_ATTENTION_MARGIN = 0.8


@functools.cache
def half_attention_is_faster(dtype: torch.dtype) -> bool:
    """True when torch's CPU attention (SDPA) runs a decode row faster in `dtype` (bfloat16,
    float16) than converted to float32 and back. Measured, not read off the flags: on an Intel Xeon
    with AVX512-BF16 a SmolLM2 decode row over 1,000 keys took 87 us in bfloat16 against 180 us
    through float32 (torch 2.13, 2 threads), while on an AMD EPYC with AVX512-BF16 bfloat16 was
    4-9x slower. Runs once per dtype in a process (a few milliseconds)."""
    import time

    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 9, 1, 64, generator=generator).to(dtype)  # (1, heads, 1, head_dim)
    key = torch.randn(1, 3, 1024, 64, generator=generator).to(dtype)  # (1, kv_heads, keys, head_dim)
    value = torch.randn(1, 3, 1024, 64, generator=generator).to(dtype)

    def half() -> None:
        F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    def upcast() -> None:
        F.scaled_dot_product_attention(query.float(), key.float(), value.float(), enable_gqa=True).to(dtype)

    def best(run: Callable[[], None]) -> float:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times[2:])  # the first runs pay for allocations

    with torch.inference_mode():
        half_s, upcast_s = best(half), best(upcast)
    faster = half_s < HALF_ATTENTION_MARGIN * upcast_s
    log.info(
        "CPU attention in %s: %.0f us a decode row, through float32 %.0f us: %s",
        dtype,
        half_s * 1e6,
        upcast_s * 1e6,
        "half precision" if faster else "float32",
    )
    return faster

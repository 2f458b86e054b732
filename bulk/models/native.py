"""The native code of the decode step: `csrc/`, built on first use.

Seven operations, in one library:

  decode_layers     a model's decode step, every layer, as one call, for every family
                    `llama_step` runs (`csrc/decode_layers.cpp`)
  decode_attention  every decode row's attention over its KV range in the pool, for one layer, as
                    one call (`csrc/decode_attention.cpp`; `batched_attention.attend` uses it for
                    the decode rows of every model it batches, `decode_layers` for its rows)
  argmax_rows       greedy rows' choice over a step's logits, `torch.argmax` at vector width
                    (`csrc/greedy.cpp`; the model runner's `sample`)
  add_rms_norm      a bfloat16 prompt step's residual add and the RMS norm after it, in one pass,
                    bit for bit ATen's operations (`csrc/prompt_ops.cpp`; `llama_step`'s Python loop)
  apply_token_bitmask  a structured output's grammar mask on a row of logits, in place
                    (`csrc/token_mask.cpp`; the model runner's `sample`)
  tile_linear       a quantized layer's product for a few rows on AMX tiles, or on AVX512-BF16's
                    pair dot product without them (`csrc/tile_linear.cpp`;
                    `weight_quant.WeightOnlyLinear` and `decode_layers`)
  prompt_attention  a bfloat16 prompt chunk's attention over its keys in the pool, on AMX tiles or
                    AVX512-BF16 (`csrc/prompt_attention.cpp`; `batched_attention.attend`)

Why the layers: a decode step of SmolLM2-135M with 4-bit weights runs about 2,000 small PyTorch
operations (65 a layer, 30 layers: norms, rotary embedding, the KV write, attention, residuals),
each a microsecond or more of Python and argument parsing around a few hundred nanoseconds of work,
and holds the interpreter lock between them, so that the server's event loop, which streams each
token, waits for it. The C++ file runs the same ATen operations, with the same arguments, in the
same order as `llama_step.LlamaStep`'s Python loop (bit-identical, and `llama_step.build` checks it
against transformers' forward at load as it checks the Python loop), in one call that releases the
lock throughout.

Why the attention: a decode row's attention is a few microseconds of arithmetic over its request's
keys and values, and one SDPA call per row and layer cost more than that in the call's own setup
and, from Python, in the calls themselves: at 16 rows, a third of a SmolLM2 step. `decode_attention`
does every row of a layer in one call: (row, key head, slice of keys) tasks spread over the threads,
each key and value read once (a bfloat16 pool as it is) for all the query heads of its group, the
slices' softmaxes merged per row. It sums in another order than SDPA, so its outputs differ from
SDPA's in the last bits: both of the engine's forwards use it for decode rows (through the step
batch) and stay bit-identical to each other, and a row computes the same bits whatever runs beside
it. Shapes it has no kernel for go to SDPA, one call per row, from C++.

It is built with torch's own extension builder (`torch.utils.cpp_extension.load`: a C++ compiler
and ninja, about 15 s on 2 cores), for this machine's instruction set, into `~/.cache/bul/native/`,
once per source, torch version and CPU; later processes load the built library. Where it cannot be
built (no compiler) the engine logs why and keeps the Python loop and one SDPA call per decode
row from Python, slower, with the same answers up to the last bits of attention. `decode_layers`
covers steps of decode rows only (one new token per request; each matrix product takes the
quantized kernel or the dense copy by the number of rows, as `WeightOnlyLinear` does) of a model
whose layers are all quantized (`weight_quant.WeightOnlyLinear`, q/k/v and gate/up fused) or all
dense (`packed_linear.PackedLinear` or `nn.Linear`, q/k/v and gate/up apart, as transformers
multiplies them): prompt chunks are a few large matrix products, where Python's share is small.

One loop serves every family, from a small description rather than a copy per family: the family's
activation, norm kind (Gemma's `1 + weight`), where its q/k head norms apply and its attention
soft-cap (`NativeFamily`); each layer's projections, up to six norms (Gemma's sandwich norms, Qwen
3's and Gemma 3's head norms), which of the step's rotary embeddings it takes or none (SmolLM3),
and its sliding window (`NativeLayer`).

`NativeLayers` is the Python face of the layers' call: what it takes from a model's layers
(`llama_step` describes them; checked to be laid out as the C++ file expects), when a step is one it
runs (`takes`), and the call itself (`run`)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bulk.models import batched_attention
from bulk.models.batched_attention import StepBatch
from bulk.models.packed_linear import PackedLinear
from bulk.models.weight_quant import WeightOnlyLinear

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    CSRC / "decode_layers.cpp",
    CSRC / "decode_attention.cpp",
    CSRC / "greedy.cpp",
    CSRC / "prompt_ops.cpp",
    CSRC / "token_mask.cpp",
    CSRC / "tile_linear.cpp",
    CSRC / "prompt_attention.cpp",
)
HEADERS = (CSRC / "decode_attention.h", CSRC / "tile_linear.h", CSRC / "tiles.h", CSRC / "vec.h")
# For this machine's instruction set (the library's name carries the CPU's flags, so that another
# CPU builds its own). OpenMP as torch's own: `at::parallel_for` is a header's `omp parallel`, which
# a file compiled without -fopenmp runs on one thread.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return root / "bul" / "native"


@functools.cache
def library() -> bool:
    """Build or load the native library once per process; False where it cannot be built (logged
    once). The `native_decode` setting decides whether it is asked for."""
    if _loaded("decode_layers") is not None:
        return True
    try:
        _build_and_load()
    except Exception as exc:  # no compiler, no ninja, a build error: Python and SDPA stay
        log.warning("native decode code unavailable, decoding through Python and SDPA: %s", exc)
        return False
    return _loaded("decode_layers") is not None


def decode_layers() -> Callable[..., Any] | None:
    """`torch.ops.bul.decode_layers`, or None where the library cannot be built."""
    return _loaded("decode_layers") if library() else None


def decode_attention() -> Callable[..., Any] | None:
    """`torch.ops.bul.decode_attention` (see the module's docstring), or None where the library
    cannot be built."""
    return _loaded("decode_attention") if library() else None


def rotary_write_kv() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.bul.rotary_write_kv`: one layer's rotary embedding of the query and key heads and
    the pool write of the keys and values, from the fused q/k/v output, for bfloat16 activations (bit
    for bit what `llama_step`'s operations compute; `csrc/decode_layers.cpp`), or None where the
    library cannot be built."""
    return _loaded("rotary_write_kv") if library() else None


def add_rms_norm() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """`torch.ops.bul.add_rms_norm(x, residual or None, weight, eps)` -> (residual + x, its RMS norm
    times weight), each (..., n): a bfloat16 prompt step's residual add and the norm after it in one
    pass, bit for bit ATen's operations (`csrc/prompt_ops.cpp`; other inputs run those), or None where
    the library cannot be built."""
    return _loaded("add_rms_norm") if library() else None


def apply_token_bitmask() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """`torch.ops.bul.apply_token_bitmask(logits, mask)`: a structured output's mask (int32 words, bit
    i of word w allowing token 32 * w + i) applied to a row of logits in place, the tokens it does
    not allow set to -inf (`csrc/token_mask.cpp`), or None where the library cannot be built."""
    return _loaded("apply_token_bitmask") if library() else None


def argmax_rows() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`torch.ops.bul.argmax_rows`: `torch.argmax(logits, dim=-1)` over a step's (rows, vocab) logits
    at vector width (`csrc/greedy.cpp`), or None where the library cannot be built."""
    return _loaded("argmax_rows") if library() else None


def tile_linear() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.bul.tile_linear(x, weights, scales, bits, bias)`: a quantized layer's product for a
    few rows on AMX tiles, or on AVX512-BF16's pair dot product where there are none
    (`csrc/tile_linear.cpp`, `weight_quant`'s tile layout), or None where the library cannot be
    built or this CPU (or its build) has neither."""
    return _tile_op("tile_linear")


def prompt_attention() -> Callable[..., torch.Tensor] | None:
    """`torch.ops.bul.prompt_attention(query, layer, first, end, position, window, scaling)`: a
    bfloat16 prompt chunk's attention over its keys in the pool on AMX tiles, or on AVX512-BF16's
    pair dot product where there are none (`csrc/prompt_attention.cpp`), or None where the library
    cannot be built or this CPU (or its build) has neither. `batched_attention.attend` checks the
    dtypes and head size it takes."""
    return _tile_op("prompt_attention")


def _tile_op(name: str) -> Callable[..., torch.Tensor] | None:
    """A tile kernel of the library (`csrc/tiles.h`), or None where the library cannot be built or
    this CPU cannot run it: its build has neither AMX tiles nor AVX512-BF16 (where Linux refuses
    this process the tile registers, the kernels run on the vector unit)."""
    available = _loaded("tile_linear_available") if library() else None
    if available is None or not available():
        return None
    return _loaded(name)


def has_decode_kernel(model: Any) -> bool:
    """Whether `decode_attention` reads `model`'s pool (in its dtype) through its own kernel, half
    precision as it is, rather than through SDPA per row: its head size and grouping have one."""
    op = _loaded("has_decode_kernel") if library() else None
    if op is None:
        return False
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return bool(op(next(model.parameters()).dtype, head_dim, heads // kv_heads))


def _loaded(name: str) -> Callable[..., Any] | None:
    try:
        return getattr(torch.ops.bul, name)
    except (AttributeError, RuntimeError):  # not registered in this process
        return None


# The MLP's gate activations the native layers compute, by transformers' config name.
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}


@dataclass(frozen=True)
class NativeFamily:
    """What a family's layers do beyond Llama's, as the native call reads it (from
    `llama_step.Layout`)."""

    activation: str = "silu"  # a key of `ACTIVATIONS`
    one_plus_norms: bool = False  # Gemma's norms: their weights given as the float32 `1 + weight`
    head_norms_after_transpose: bool = False  # Gemma 3's q/k norms on (1, heads, N, head_dim)
    softcap: float = 0.0  # Gemma 2's attention score soft-capping, 0 for none


@dataclass(frozen=True)
class NativeLayer:
    """One decoder layer as the native call takes it: `llama_step` describes each of a model's."""

    # In `SLOTS` order: q/k/v as one projection (fused, or Phi-3's own) with k and v None, or q, k
    # and v (an unquantized model's, whose layers are not fused); o; gate/up likewise; down.
    projections: tuple[Any, ...]
    gate_size: int  # the gate's share of a fused gate/up's outputs
    # (weight, epsilon) of the norms, or None where the layer has none: the input norm, the MLP's
    # input norm, the attention's and the MLP's output norms (Gemma's sandwich), the query's and
    # the key's head norms (Qwen 3, Gemma 3). Gemma's weights are its float32 factors `1 + weight`.
    norms: tuple[tuple[torch.Tensor, float] | None, ...]
    scaling: float
    rotary: int  # which of the step's (cos, sin) pairs it rotates with; -1: no rotary (SmolLM3)
    window: int  # its sliding window in tokens, 0 for full attention


# The projections' order in `NativeLayer.projections` and in the C++ call (`Slot` there).
SLOTS = ("q", "k", "v", "o", "gate", "up", "down")
# The norms' order in `NativeLayer.norms` and in the C++ call (`NORMS` there).
NORM_SLOTS = ("input", "mlp_input", "attention_output", "mlp_output", "query_heads", "key_heads")


class _LayerParts(NamedTuple):
    norms: list[torch.Tensor]  # NORM_SLOTS, an empty tensor where the layer has none
    shapes: list[int]  # rotary index, window
    # per `SLOTS`: (qweight, scales, tile weights, tile scales), empty where not quantized
    weights: list[torch.Tensor]
    dense: list[torch.Tensor]  # per `SLOTS`: the dense weight (`dense_weight`, or the layer's), empty: none
    biases: list[torch.Tensor | None]  # per `SLOTS` (Qwen2's q/k/v have one)
    bits: list[int]  # per `SLOTS`: 4 or 8, 16 where not quantized
    # group size, eps, scaling, gate size, dense_from_rows, tiles_from_rows
    shape: tuple[int, float, float, int, int, int]


@dataclass(frozen=True)
class NativeLayers:
    """`decode_layers` and what it takes besides the step: every layer's norm weights, quantized
    weights and description, and the model's shapes, in the order of the C++ signature."""

    call: Callable[..., torch.Tensor]
    norms: list[torch.Tensor]  # per layer: `NORM_SLOTS`, an empty tensor for none
    layer_shapes: list[int]  # per layer: rotary index (-1: none), sliding window (0: none)
    # per layer and `SLOTS`: (qweight, scales, tile weights, tile scales)
    weights: list[torch.Tensor]
    dense: list[torch.Tensor]  # per layer and `SLOTS`: the dense weight, empty for an empty slot
    biases: list[torch.Tensor | None]  # per layer and `SLOTS`: the bias or None
    bits: list[int]  # per layer and `SLOTS`
    group_size: int
    dense_from_rows: int  # `WeightOnlyLinear.dense_from_rows`
    tiles_from_rows: int  # `WeightOnlyLinear.tiles_from_rows`
    q_heads: int
    kv_heads: int
    head_dim: int
    gate_size: int
    eps: float
    scaling: float
    family: NativeFamily
    float32_attention: bool

    @classmethod
    def of(
        cls,
        layers: Sequence[NativeLayer],
        family: NativeFamily,
        heads: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> NativeLayers | None:
        """For a model's decoder `layers` as `llama_step` describes them, with (query heads, key
        heads, head size) `heads` and parameters of `dtype` on `device`: None unless every layer is
        laid out as the native call expects (every projection quantized, or every one dense), and
        the call could be built."""
        q_heads, kv_heads, head_dim = heads
        if head_dim > batched_attention.GQA_HEAD_DIM or not layers or family.activation not in ACTIVATIONS:
            return None
        try:
            parts = [_layer_parts(layer) for layer in layers]
        except (AttributeError, TypeError):
            return None
        known = [p for p in parts if p is not None]
        shapes = {p.shape for p in known}
        if len(known) != len(parts) or len(shapes) != 1:
            return None
        group_size, eps, scaling, gate_size, dense_from_rows, tiles_from_rows = shapes.pop()
        call = decode_layers()
        if call is None:
            return None
        return cls(
            call=call,
            norms=[t for p in known for t in p.norms],
            layer_shapes=[v for p in known for v in p.shapes],
            weights=[t for p in known for t in p.weights],
            dense=[t for p in known for t in p.dense],
            biases=[t for p in known for t in p.biases],
            bits=[b for p in known for b in p.bits],
            group_size=group_size,
            dense_from_rows=dense_from_rows,
            tiles_from_rows=tiles_from_rows,
            q_heads=q_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            gate_size=gate_size,
            eps=eps,
            scaling=scaling,
            family=family,
            float32_attention=batched_attention.attends_in_float32(dtype, device),
        )

    def takes(self, batch: StepBatch, n: int) -> bool:
        """A step of decode rows only (`StepBatch.rows_from`: not one-token prompt chunks, which
        SDPA computes) with the native decode attention, and no padding."""
        return (
            batch.rows_from == 0
            and batch.decode_attention is not None
            and n == len(batch.segments) == batch.write_at.shape[0]
        )

    def run(self, hidden: torch.Tensor, angles: list[torch.Tensor], batch: StepBatch) -> torch.Tensor:
        """`angles`: the step's (cos, signed sin) pairs, flat, in the order of the layers' `rotary`."""
        family = self.family
        return self.call(
            hidden, angles, batch.pool, batch.write_at, batch.row_starts, batch.row_ends, self.norms,
            self.layer_shapes, self.weights, self.dense, self.biases, self.bits, self.group_size,
            self.dense_from_rows, self.tiles_from_rows, self.q_heads, self.kv_heads, self.head_dim,
            self.gate_size, self.eps, self.scaling, ACTIVATIONS[family.activation], family.one_plus_norms,
            family.head_norms_after_transpose, family.softcap, self.float32_attention,
        )  # fmt: skip


# What the native call gets for a projection without tiles (or not quantized), for an empty slot,
# and for a norm the layer does not have.
_NO_TILES = torch.empty(0, dtype=torch.uint8)
_EMPTY = torch.empty(0)
_NO_NORM = torch.empty(0)
# A dense layer's row thresholds: its weight for every row count (`linear` in the C++ file).
_DENSE_SPLIT = (0, 1 << 30)


# A slot's arguments: (qweight, scales, tiles, tile scales), dense weight, bias, bits.
_Slot = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, int]


def _slot(p: Any) -> _Slot | None:
    """(qweight, scales, tiles, tile scales), dense weight, bias and bits of a projection as the
    native call multiplies it: a quantized layer (`WeightOnlyLinear`), or a dense one through its
    weight as it is (`PackedLinear`'s prepacked for oneDNN, an `nn.Linear`'s plain), which is what
    their forwards compute; None for any other module."""
    if isinstance(p, WeightOnlyLinear):
        return [p.qweight, p.scales, *(p.tiles or (_NO_TILES, _NO_TILES))], p.dense_weight(), p.bias, p.bits
    if isinstance(p, PackedLinear) or type(p) is torch.nn.Linear:
        return [_NO_TILES] * 4, p.weight, p.bias, 16
    return None


def _layer_parts(layer: NativeLayer) -> _LayerParts | None:
    """One layer's arguments, or None when the native call cannot run it: a projection neither
    quantized nor dense, quantized and dense ones mixed, the quantized ones' group sizes or row
    thresholds differing, or its norms' epsilons."""
    if len(layer.projections) != len(SLOTS):
        return None
    empty: _Slot = ([_NO_TILES] * 4, _EMPTY, None, 16)
    slots = [empty if p is None else _slot(p) for p in layer.projections]
    known = [slot for slot in slots if slot is not None]
    if len(known) != len(slots):  # a projection neither quantized nor dense
        return None
    present = [p for p in layer.projections if p is not None]
    quantized = [p for p in present if isinstance(p, WeightOnlyLinear)]
    if quantized and len(quantized) != len(present):
        return None
    splits = {(p.dense_from_rows, p.tiles_from_rows) for p in quantized} or {_DENSE_SPLIT}
    if len({p.group_size for p in quantized}) > 1 or len(splits) != 1:
        return None
    group_size = quantized[0].group_size if quantized else 0
    dense_from_rows, tiles_from_rows = splits.pop()
    if len(layer.norms) != len(NORM_SLOTS) or layer.norms[0] is None or layer.norms[1] is None:
        return None
    epsilons = {norm[1] for norm in layer.norms if norm is not None}
    if len(epsilons) != 1:
        return None
    return _LayerParts(
        norms=[_NO_NORM if norm is None else norm[0] for norm in layer.norms],
        shapes=[layer.rotary, layer.window],
        weights=[t for slot in known for t in slot[0]],
        dense=[slot[1] for slot in known],
        biases=[slot[2] for slot in known],
        bits=[slot[3] for slot in known],
        shape=(
            group_size,
            float(epsilons.pop()),
            float(layer.scaling),
            layer.gate_size,
            dense_from_rows,
            tiles_from_rows,
        ),
    )


def _build_and_load() -> None:
    try:
        _build_and_load_with(openmp=True)
    except Exception as exc:
        # A compiler without OpenMP (Apple's clang, say): the same code, its tasks on one thread.
        log.warning("native code without OpenMP, its attention on one thread: %s", exc)
        _build_and_load_with(openmp=False)


def _build_and_load_with(openmp: bool) -> None:
    from torch.utils import cpp_extension

    from bulk.models import cpu

    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    flags = cpu.flags()
    # For this machine's instruction set only where its features are known (x86's /proc/cpuinfo
    # flags, in the library's name): elsewhere a library built for one CPU could be loaded on
    # another from a shared cache and die of an illegal instruction.
    cflags = CFLAGS if flags else [f for f in CFLAGS if f != "-march=native"]
    if not openmp:
        cflags = [f for f in cflags if f != "-fopenmp"]
    digest.update(" ".join(cflags).encode())
    digest.update(platform.machine().encode())
    digest.update(" ".join(sorted(flags)).encode())
    name = f"bul_native_{digest.hexdigest()[:12]}"
    build = cache_dir() / f"torch-{torch.__version__}" / name
    build.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if shutil.which("ninja") is None:
        # torch's builder runs `ninja` from PATH: use the one that `pip install bulk` put beside
        # this interpreter when the virtualenv is not activated.
        scripts = str(Path(sys.executable).parent)
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    cpp_extension.load(
        name=name,
        sources=[str(path) for path in SOURCES],
        build_directory=str(build),
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"] if openmp else [],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=False,
    )
    log.info("native decode code ready (%s, %.1f s)", build, time.perf_counter() - started)

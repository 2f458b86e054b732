"""GGUF (llama.cpp) model files, converted once into an ordinary Hugging Face folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, with the `gguf` and
`accelerate` packages) by dequantizing every tensor, which takes seconds to minutes. So the first
load converts the file into a folder of safetensors weights (float32: dequantized values are not
exact in half precision), tokenizer files and chat template, named by the file's SHA-256 under the
model cache (`model_cache_path`); later loads find that folder and load it like any model directory,
without the GGUF packages. A model loaded from GGUF refuses `save_pretrained`, so its state dict is
copied into a fresh model built from the same configuration without its `quantization_config`.

The manifest also records the layout of the file's transformer weights (`weight_layout`: "Q4_K",
"Q8_0"...) and its bit width (`weight_bits`), so that `weight_quantization="auto"` can serve a 4-bit
file at 4 bits without reading the file again, and the load log line can say why. A file whose
architecture transformers cannot read as a causal language model is refused before conversion, with
a message naming it (`check_architecture`).

The folder appears under its final name only once complete (written under a temporary name, then
renamed), so two processes converting the same file at once both end with one good folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from bulk.errors import ModelLoadError
from bulk.models.progress import quiet_progress_bars

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Written into every converted folder: what it was converted from, and by which transformers.
MANIFEST = "bul-gguf.json"
_CHUNK = 8 << 20


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weight_bits(path: Path) -> int | None:
    """The bit width that serves the transformer blocks' weights of the GGUF file `path` without
    losing precision they have: 4 for Q4 and smaller layouts, 8 for Q5 to Q8, None for 16- and
    32-bit floats. Decided by the most common layout among the blocks' matrices (files keep a few
    layers at more bits). Needs the `gguf` package; about 2 s for a 100 MB file."""
    return layout_bits(weight_layout(path))


def weight_layout(path: Path) -> str | None:
    """The most common layout (ggml type name: "Q4_K", "Q8_0", "F16"...) among the transformer
    blocks' matrices of the GGUF file `path`, None if it has none. Needs the `gguf` package."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(path)
    layouts = Counter(
        t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    )
    return layouts.most_common(1)[0][0] if layouts else None


def layout_bits(layout: str | None) -> int | None:
    """`weight_bits` of a file whose blocks' matrices are mostly `layout`."""
    if layout is None or layout.startswith(("F", "BF")):
        return None
    if layout.startswith(("Q5", "Q6", "Q8")):
        return 8
    return 4  # Q4_*, Q3_K, Q2_K, IQ*: 4 bits or fewer


# General architectures transformers reads from GGUF but that are not causal language models.
_NOT_CAUSAL = {"t5", "t5encoder", "umt5"}
# Architectures transformers lists as read from GGUF that still cannot be served, and why (each seen
# failing on a file written as llama.cpp writes it; `tests/models/test_gguf_architectures.py`).
_CANNOT_SERVE = {
    # Its tensor processor stores the experts under names GptOssForCausalLM does not have, and the
    # names llama.cpp writes (ffn_gate_exps...) map to nothing: the experts would be random values.
    "gpt_oss": "transformers' GGUF reader does not load its experts' weights, which would be left random",
    # Listed by the GGUF reader, but transformers has no "deci" model type to build.
    "deci": "transformers has no model for it (no 'deci' model type)",
    # Its layers differ in head size (`per_layer_config`), and the config refuses the one head size
    # the engine's loader reads.
    "gemma4": "its layers differ in head size, which this engine does not serve yet",
    # A state-space model: no attention layers, which the engine's KV cache and loader need.
    "mamba": "it has no attention layers (a state-space model), and this engine serves attention models",
}


def architecture(path: Path) -> str:
    """The `general.architecture` of the GGUF file `path` (needs the `gguf` package)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None or not field.data:
        return ""
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def check_architecture(path: Path) -> None:
    """Raises `ModelLoadError`, naming the architecture, when transformers cannot read the GGUF file
    `path` as a causal language model (an architecture it has no GGUF mapping for, or an encoder),
    or reads it but the result cannot be served (`_CANNOT_SERVE`)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    name = architecture(path)
    # transformers' own renames (load_gguf_checkpoint): llama.cpp spells some without underscores.
    renamed = name.replace("-", "_").replace("moe", "_moe").replace("__", "_")
    readable = set(GGUF_SUPPORTED_ARCHITECTURES) | _newer_gguf_architectures()
    supported = sorted(readable - {"general", "tokenizer"} - _NOT_CAUSAL)
    refused = _CANNOT_SERVE.get(name) or _CANNOT_SERVE.get(renamed)
    if refused is not None:
        raise ModelLoadError(f"{path}: GGUF architecture {name!r} cannot be served ({refused})")
    if name in supported or renamed in supported:
        return
    if name in _NOT_CAUSAL:
        why = "it is an encoder or encoder-decoder model, not a causal language model"
    else:
        why = f"transformers {transformers.__version__} reads only these from GGUF: {', '.join(supported)}"
    raise ModelLoadError(
        f"{path}: GGUF architecture {name or '(none)'!r} cannot be served ({why}); "
        "load the model's Hugging Face folder instead"
    )


def _newer_gguf_architectures() -> set[str]:
    """The architectures transformers 5 reads through its newer GGUF path (`integrations.gguf`:
    Qwen 3.5, LFM2...), which `GGUF_SUPPORTED_ARCHITECTURES` (the older reader's list) leaves out;
    empty before that path existed."""
    try:
        from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS
    except ImportError:
        return set()
    return set(GGUF_CONFIG_ARCHS)


def manifest_weight_bits(folder: Path, path: Path) -> int | None:
    """`weight_bits` of the file converted into `folder`, from its manifest (see `manifest_weights`)."""
    return manifest_weights(folder, path)[1]


def manifest_weights(folder: Path, path: Path) -> tuple[str | None, int | None]:
    """`weight_layout` and `weight_bits` of the file converted into `folder`, from its manifest; a
    folder converted before the manifest recorded them gets them added, read once from `path`
    (without the `gguf` package: what the manifest has, else None)."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    recorded = manifest.get("weight_bits")
    recorded_bits = recorded if recorded in (4, 8) else None
    if "weight_bits" in manifest and "weight_layout" in manifest:
        layout = manifest["weight_layout"]
        return (layout if isinstance(layout, str) else None), recorded_bits
    if missing_packages():  # (a folder converted before the layout was recorded has its bits)
        return None, recorded_bits
    layout = weight_layout(path)
    bits = layout_bits(layout)
    manifest["weight_layout"] = layout
    manifest["weight_bits"] = bits
    partial = folder / f".{MANIFEST}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(manifest_path)
    except OSError:  # a read-only cache still loads; the bits are read again next time
        log.debug("could not record weight_bits in %s", manifest_path, exc_info=True)
        partial.unlink(missing_ok=True)
    return layout, bits


def missing_packages() -> list[str]:
    """The packages a GGUF conversion needs (the `gguf` extra) that are not installed."""
    return [name for name in ("gguf", "accelerate") if not _installed(name)]


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules (set to None)
        return False


def converted_folder(path: Path, cache_root: Path, expected_sha256: str | None = None) -> Path:
    """The Hugging Face folder converted from the GGUF file `path`, converting it on first use.
    `expected_sha256`: the file must have this SHA-256 (a named model's file). Raises
    `ModelLoadError` for a missing, corrupted or unexpected file and when a conversion needs the
    `gguf` extra and it is not installed."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        if fh.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    started = time.perf_counter()
    digest = file_sha256(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelLoadError(
            f"{path} has SHA-256 {digest}, expected {expected_sha256}: the file is corrupted or not "
            "the one this model name stands for; reinstall it"
        )
    folder = cache_root / digest
    if (folder / "config.json").is_file():
        log.info(
            "GGUF %s (sha256 %s, hashed in %.1f s): using %s",
            path.name,
            digest[:12],
            time.perf_counter() - started,
            folder,
        )
        return folder
    missing = missing_packages()
    if missing:
        raise ModelLoadError(
            f"loading the GGUF model {path} needs the {' and '.join(missing)} package(s): "
            "pip install 'bulk[gguf]'"
        )
    check_architecture(path)
    log.info("converting GGUF %s into %s, once (later starts load the folder)", path, folder)
    with quiet_progress_bars():
        _convert(path, folder, digest)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - started)
    return folder


def _dequantized_load() -> dict:
    """`from_pretrained` arguments that load every weight dequantized. transformers 5 keeps the
    weights of the architectures its newer GGUF path reads (Qwen 3.5, LFM2) packed in GGUF blocks
    when the `kernels` package can fetch a matmul kernel for the machine: a state dict of uint8
    blocks that the fresh float32 model below cannot take. Older versions always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert(path: Path, folder: Path, digest: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{digest[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **_dequantized_load()
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        del loaded
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        manifest = {
            "source": path.name,
            "sha256": digest,
            "transformers": transformers.__version__,
            "weight_layout": (layout := weight_layout(path)),
            "weight_bits": layout_bits(layout),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            log.info("another process converted %s meanwhile; using its folder", path.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)

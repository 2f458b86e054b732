"""The decode step's layers as one native call: `csrc/llama_decode.cpp`, built on first use.

Why: a decode step of SmolLM2-135M with 4-bit weights runs about 2,000 small PyTorch operations
(65 a layer, 30 layers: norms, rotary embedding, the KV write, attention, residuals), each a
microsecond or more of Python and argument parsing around a few hundred nanoseconds of work, and
holds the interpreter lock between them, so that the server's event loop, which streams each token,
waits for it. The C++ file runs the same ATen operations, with the same arguments, in the same
order as `llama_step.LlamaStep`'s Python loop (bit-identical, and `llama_step.build` checks it
against transformers' forward at load as it checks the Python loop), in one call that releases the
lock throughout.

It is built with torch's own extension builder (`torch.utils.cpp_extension.load`: a C++ compiler
and ninja, about 10 s on 2 cores) into `~/.cache/bul/native/`, once per source and torch version;
later processes load the built library. Where it cannot be built (no compiler) the engine logs why
and keeps the Python loop, which computes the same bits, a little slower. The call covers decode
rows only (one new token per request, fewer rows than `weight_quant.DENSE_FROM_ROWS`) of a model
whose layers are all quantized (`weight_quant.WeightOnlyLinear`, fused q/k/v and gate/up, no bias):
prompt chunks are a few large matrix products, where Python's share is small.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "llama_decode.cpp"


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return root / "bul" / "native"


@functools.cache
def decode_layers() -> Callable[..., Any] | None:
    """`torch.ops.bul.llama_decode_layers`, built or loaded once per process; None where it cannot
    be built (logged once). The `native_decode` setting decides whether it is asked for."""
    op = _loaded()
    if op is None:
        try:
            _build_and_load()
        except Exception as exc:  # no compiler, no ninja, a build error: the Python loop stays
            log.warning("native decode layers unavailable, decoding through Python: %s", exc)
            return None
        op = _loaded()
    return op


def _loaded() -> Callable[..., Any] | None:
    import torch

    try:
        return torch.ops.bul.llama_decode_layers
    except (AttributeError, RuntimeError):  # not registered in this process
        return None


def _build_and_load() -> None:
    import torch
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    name = f"bul_llama_decode_{digest}"
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
        sources=[str(SOURCE)],
        build_directory=str(build),
        extra_cflags=["-O2"],
        is_python_module=False,
        verbose=False,
    )
    log.info("native decode layers ready (%s, %.1f s)", build, time.perf_counter() - started)

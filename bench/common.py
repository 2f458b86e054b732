"""Helpers shared by every benchmark: options, timing, tables, results files, ratios.

A benchmark measures in one process, prints a plain-text table and writes the same figures as JSON
under `bench/results/` (`<name>-<UTC timestamp>.json`, plus `<name>-latest.json` for tools that only
want the newest), with enough about the machine to tell two results files apart."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def options_from(base: Mapping[str, Any], args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """A copy of `base` (a benchmark's DEFAULTS or QUICK) with each of `keys` the command line gave."""
    options = dict(base)
    for key in keys:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def time_ms(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall time of one call of `fn`, in milliseconds, and what it returned."""
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive (JSON has no infinity)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned. Floats are printed
    with one decimal; None as "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        parts = [first.ljust(widths[0])] + [v.rjust(w) for v, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line([str(h) for h in headers]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in text)
    return "\n".join(out)


# The /proc/cpuinfo flags that decide which kernels a CPU engine runs (a results file names them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_summary(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which of `CPU_FLAGS` it lists, from /proc/cpuinfo (`cpuinfo`: its
    text, read when not given); empty where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    from bulk.models.cpu import cpuinfo_flags

    name = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
            break
    flags = cpuinfo_flags(cpuinfo) or frozenset()
    return {"model_name": name, "flags": [f for f in CPU_FLAGS if f in flags]}


def machine_info() -> dict[str, Any]:
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a core dependency
        transformers_version = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_summary(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers_version,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, payload: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write `payload` (plus machine info and a timestamp) to `<out_dir>/<name>-<UTC timestamp>.json`
    and `<out_dir>/<name>-latest.json`; return the timestamped path. `out_dir` defaults to
    `bench/results/`."""
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    document = {"benchmark": name, "created": now.isoformat(), "machine": machine_info(), **payload}
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{name}-{stamp}.json"
    suffix = 1
    while path.exists():  # two runs within one second
        path = directory / f"{name}-{stamp}-{suffix}.json"
        suffix += 1
    path.write_text(text)
    (directory / f"{name}-latest.json").write_text(text)
    return path


def named_model_folder(name: str) -> Path:
    """The Hugging Face folder our server converts the named model's GGUF file into (converting it
    now when it is not there yet), under the model cache our server uses."""
    from bulk import named_models
    from bulk.config import KVCacheConfig
    from bulk.models.gguf import converted_folder

    cache = os.environ.get("BUL_MODEL_CACHE_PATH") or KVCacheConfig.model_cache_path
    named = named_models.NAMED_MODELS[name]
    path = named_models.named_model_file(name)
    return converted_folder(path, Path(cache).expanduser(), expected_sha256=named.sha256)

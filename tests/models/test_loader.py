"""Loading a Hugging Face causal LM from a local directory, through the same engine path."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import ModelLoadError
from bulk.models.loader import load_model
from tests.tiny_hf_model import save_tiny_llama

CORPUS = [
    "Create marketing strategy for a bakery.",
    "Summarise the quarterly sales report.",
    "Draft a hiring plan for the engineering team.",
] * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), CORPUS, seed=3)


def test_loads_a_saved_directory(hf_dir):
    lm = load_model(KVCacheConfig(model=str(hf_dir)))
    assert lm.context_length == 512 and lm.num_layers == 2 and lm.num_kv_heads == 2 and lm.head_dim == 16
    assert lm.fingerprint.startswith("hf:") and lm.supports_block_reuse
    assert lm.fingerprint == load_model(KVCacheConfig(model=str(hf_dir))).fingerprint
    assert (
        lm.tokenizer.decode(lm.tokenizer.encode("Create marketing strategy")).strip()
        == "Create marketing strategy"
    )


def test_engine_reuses_prefixes_of_a_hf_model(hf_dir):
    config = KVCacheConfig(model=str(hf_dir), block_size=4, response_cache=False, default_max_new_tokens=10)
    prompt = "Create marketing strategy for a bakery. Summarise the quarterly sales report."
    with UltraAdaptiveKVCacheEngine(config) as engine:
        first = engine.process_request_sync({"query": prompt})
        second = engine.process_request_sync({"query": prompt})
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0
    assert first["result"] == second["result"]


def test_a_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(KVCacheConfig(model=str(tmp_path)))


def test_a_model_without_attention_heads_is_refused_with_a_typed_error(hf_dir, tmp_path):
    """A Mamba folder loads in transformers, but has no attention heads for the KV pool: a
    ModelLoadError naming it, not an AttributeError from deep in the loader."""
    from transformers import MambaConfig, MambaForCausalLM

    folder = tmp_path / "mamba"
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(folder)
    MambaForCausalLM(
        MambaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, state_size=4)
    ).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=r"\(mamba\): the KV pool needs one number of attention heads"):
        load_model(KVCacheConfig(model=str(folder)))

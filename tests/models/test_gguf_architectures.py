"""Every other architecture transformers lists as read from GGUF, tried on a tiny file of it
(`tests.tiny_gguf.write_model_gguf`: a random tiny transformers model written under the GGUF names and
value transforms transformers reads back, its matrices Q8_0, and again Q4_K as llama.cpp's Q4_K_M mix
writes them, the k-quant rows 256 values long; Qwen 3.5's mixture of experts, which
transformers 5 reads through its newer GGUF path, as llama.cpp writes it: `write_qwen35moe_gguf`).
Each one we serve loads through `model="....gguf"` holding the file's values, and answers the same
greedy tokens twice at the file's bits, the load log line saying which and why. Each one that fails,
in transformers' reader or in our engine, is refused at start with a message naming it and saying
why, before anything is converted."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bulk.errors import ModelLoadError
from bulk.models.gguf import weight_layout
from bulk.models.loader import load_model
from tests.tiny_gguf import (
    GENERIC_ARCHITECTURES,
    SERVED_BITS,
    assert_served_at_file_bits,
    write_model_gguf,
    write_qwen35moe_gguf,
    write_tiny_gguf,
)
from tests.tiny_gguf import gguf_config as _config

# Served: loaded from a tiny file and answering (the rest of `GENERIC_ARCHITECTURES` is refused below).
SERVED = (
    "qwen3_moe",
    "qwen2_moe",
    "starcoder2",
    "stablelm",
    "falcon",
    "gpt2",
    "bloom",
    "nemotron",
    "minimax_m2",
)
# The layouts each served architecture is tried at: Q8_0, and Q4_K (llama.cpp's Q4_K_M mix: the head
# and the first block's attn_v / ffn_down at Q6_K; rows that are not whole 256-value super-blocks,
# such as Qwen 2 MoE's 1408-wide experts, which transformers fixes at its default, at llama.cpp's
# fallback for them, Q5_0 or Q8_0).
SERVED_LAYOUTS = ("Q8_0", "Q4_K")
# Refused, as `general.architecture` spells it in llama.cpp's files -> why (as the message says it):
REFUSED = {
    "gpt-oss": "does not load its experts' weights",  # transformers' reader: experts left random
    "gemma4": "layers differ in head size",  # the loader reads one head size; Gemma 4's vary by layer
    "mamba": "no attention layers",  # a state-space model
    "deci": "no 'deci' model type",  # transformers has no model to build
}


def test_every_architecture_tried_is_served_or_refused():
    refused = {architecture.replace("-", "_") for architecture in REFUSED}
    assert set(SERVED) | refused == set(GENERIC_ARCHITECTURES)
    assert not set(SERVED) & refused


@pytest.mark.parametrize("layout", SERVED_LAYOUTS)
@pytest.mark.parametrize("architecture", SERVED)
def test_each_architecture_loads_the_files_values_and_answers_twice(architecture, layout, tmp_path, caplog):
    path, expected = write_model_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture, layout=layout)
    assert weight_layout(path) == layout  # the most common layout of the blocks' matrices
    cache = tmp_path / "models"
    lm = load_model(_config(path, cache, dtype="float32", weight_quantization="none"))
    assert type(lm.model) is type(expected)
    # Every parameter is the file's value (none left at a random initial value): as many, and equal.
    loaded = dict(lm.model.named_parameters())
    wanted = dict(expected.named_parameters())
    assert loaded.keys() == wanted.keys()
    for name, value in wanted.items():
        # (equal up to the float32 rounding of the few stored transformed: Mamba-style exp, 1 + w)
        torch.testing.assert_close(loaded[name].detach(), value.detach(), msg=name)
    del lm
    caplog.clear()
    config = _config(path, cache, dtype="bfloat16", weight_quantization="auto")
    assert_served_at_file_bits(config, layout, SERVED_BITS[layout], caplog)


# ... and what transformers does not read from GGUF at all, or not as a causal language model
UNREADABLE = {"mamba-x": "reads only these from GGUF: .*llama", "t5": "not a causal language model"}


@pytest.mark.parametrize(("architecture", "why"), [*REFUSED.items(), *UNREADABLE.items()])
def test_an_architecture_we_cannot_serve_is_refused_at_start_saying_why(architecture, why, tmp_path):
    path = write_tiny_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture=architecture)
    cache = tmp_path / "models"
    with pytest.raises(ModelLoadError, match=f"GGUF architecture '{architecture}' cannot be served.*{why}"):
        load_model(_config(path, cache))  # what a server does at start
    assert not cache.exists() or not any(cache.iterdir())  # refused before converting anything


def _stored(reader: gguf.GGUFReader, name: str) -> torch.Tensor:
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32))


def test_qwen35_moe_loads_its_experts_from_the_file_and_answers_one_request_at_a_time(tmp_path, caplog):
    pytest.importorskip("transformers.integrations.gguf.gguf_config_mapping")  # transformers 5's newer path
    path = write_qwen35moe_gguf(tmp_path / "tiny-qwen35moe.gguf")
    cache = tmp_path / "models"
    lm = load_model(_config(path, cache, dtype="float32", weight_quantization="none"))
    model = lm.model
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    reader = gguf.GGUFReader(path)
    # Every parameter came from the file: as many values as it holds...
    assert sum(p.numel() for p in model.parameters()) == sum(int(t.n_elements) for t in reader.tensors)
    # ...and the experts' are its values: gate and up stacked per expert, the shared gate a row.
    params = {name: p.detach() for name, p in model.named_parameters()}
    layer = "model.layers.1.mlp"
    gate, up = _stored(reader, "blk.1.ffn_gate_exps.weight"), _stored(reader, "blk.1.ffn_up_exps.weight")
    assert torch.equal(params[f"{layer}.experts.gate_up_proj"], torch.cat([gate, up], dim=1))
    assert torch.equal(params[f"{layer}.experts.down_proj"], _stored(reader, "blk.1.ffn_down_exps.weight"))
    assert torch.equal(params[f"{layer}.gate.weight"], _stored(reader, "blk.1.ffn_gate_inp.weight"))
    shared_gate = _stored(reader, "blk.1.ffn_gate_inp_shexp.weight")
    assert torch.equal(params[f"{layer}.shared_expert_gate.weight"], shared_gate.unsqueeze(0))
    shared_down = _stored(reader, "blk.1.ffn_down_shexp.weight")
    assert torch.equal(params[f"{layer}.shared_expert.down_proj.weight"], shared_down)
    del lm, model
    caplog.clear()
    config = _config(path, cache, dtype="bfloat16", weight_quantization="auto")
    assert_served_at_file_bits(config, "Q8_0", 8, caplog)
    assert any("decodes one request at a time" in r.getMessage() for r in caplog.records)

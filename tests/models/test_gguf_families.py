"""GGUF files of the other decoder families transformers reads from GGUF, as llama.cpp writes them
(`tests.tiny_gguf.write_family_gguf`: Qwen 2, Qwen 3, Phi-3, Gemma 2, Gemma 3 and Mistral, which
llama.cpp writes as a Llama file), their matrices in each layout users download: Q4_K / Q5_K
(llama.cpp's _M mixes), Q6_K, Q5_0, Q5_1 and Q8_0. Each converts with every weight taken from the
file (none left at its initial value), answers the same greedy tokens twice at the file's bits with
the load log line saying which and why, and the sliding-window ones (Gemma 2 and 3, window 8, with
their layer patterns) decode requests as one batch and reuse a prefix past the window, each answer the
one computed alone from nothing. The hybrids transformers 5 reads through its newer GGUF path
(`write_hybrid_gguf`: LFM2's short convolutions, Qwen 3.5's Gated DeltaNet) load the same way and
answer one request at a time, saying so, what the model computes from nothing. (An architecture
transformers cannot read is refused at start: `tests/models/test_gguf_architectures.py`.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import gguf
import numpy as np
import pytest
import torch

from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models import hf_cache
from bulk.models.gguf import check_architecture, weight_layout
from bulk.models.loader import load_model
from tests.conftest import generate_without_cache
from tests.tiny_gguf import (
    FAMILIES,
    FAMILY_WINDOW,
    HYBRID_FAMILIES,
    LAYOUTS,
    LFM2_LAYER_KINDS,
    QUERY,
    SERVED_BITS,
    assert_served_at_file_bits,
    greedy_from_nothing,
    write_family_gguf,
    write_hybrid_gguf,
    write_tiny_gguf,
)
from tests.tiny_gguf import gguf_config as _config

CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "mistral": "LlamaForCausalLM",  # llama.cpp's Mistral files are Llama files
    "lfm2": "Lfm2ForCausalLM",
    "qwen35": "Qwen3_5ForCausalLM",
}
# GGUF tensor -> the transformers parameter it becomes, beyond what every family has (ffn_down)
SPECIFIC = {
    "qwen2": {"blk.1.attn_q.bias": "model.layers.1.self_attn.q_proj.bias"},
    "qwen3": {"blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight"},
    "phi3": {
        "blk.1.attn_qkv.weight": "model.layers.1.self_attn.qkv_proj.weight",
        "blk.1.ffn_up.weight": "model.layers.1.mlp.gate_up_proj.weight",
    },
    "gemma2": {"blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight"},
    "gemma3": {"blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight"},
    "mistral": {"blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight"},
}
# The hybrids: GGUF tensor -> the transformers parameter it becomes (norms stored as 1 + w in `OFFSET`).
HYBRID_TENSORS = {
    "lfm2": {
        "blk.2.ffn_down.weight": "model.layers.2.feed_forward.w2.weight",
        "blk.2.shortconv.in_proj.weight": "model.layers.2.conv.in_proj.weight",
        "blk.1.attn_output.weight": "model.layers.1.self_attn.out_proj.weight",
        "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_layernorm.weight",
        "token_embd_norm.weight": "model.embedding_norm.weight",
    },
    "qwen35": {
        "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
        "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",  # query and gate rows
        "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "blk.0.ssm_norm.weight": "model.layers.0.linear_attn.norm.weight",  # the norm with no offset
        "output_norm.weight": "model.norm.weight",
    },
}
OFFSET = {"blk.1.post_attention_norm.weight", "output_norm.weight"}
HYBRID_LAYOUT = {"lfm2": "Q4_K", "qwen35": "Q8_0"}  # one k-quant file, one Q8_0 file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One model cache for the module: each file is converted once, by whichever test comes first."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = {}

    def family_file(family: str, layout: str):
        if (family, layout) not in made:
            folder = tmp_path_factory.mktemp("gguf")
            path = folder / f"tiny-{family}.{layout}.gguf"
            made[family, layout] = write_family_gguf(path, family, layout)
        return made[family, layout]

    return family_file


def _converted_from_file(
    path, cache, class_name: str, expected: dict[str, str], one_plus: Callable[[str], bool]
):
    """`path` loaded in float32 and unquantized, as a `class_name`, every parameter from the file: as
    many values as it holds (a tied head counted once), and the `expected` ones (GGUF name -> our
    parameter) its values as the `gguf` package reads them (less 1 where `one_plus` says the file
    stores 1 + w). Returns (the loaded model, the file's reader, the model's parameters)."""
    lm = load_model(_config(path, cache, dtype="float32", weight_quantization="none"))
    assert type(lm.model).__name__ == class_name
    reader = gguf.GGUFReader(path)
    assert sum(p.numel() for p in lm.model.parameters()) == sum(int(t.n_elements) for t in reader.tensors)
    params = dict(lm.model.named_parameters())
    for gguf_name, hf_name in expected.items():
        value = _dequantized(reader, gguf_name)
        if one_plus(gguf_name):
            value = value - 1
        assert torch.equal(params[hf_name].detach(), value), (gguf_name, hf_name)
    return lm, reader, params


def _dequantized(reader: gguf.GGUFReader, name: str) -> torch.Tensor:
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_converts_with_every_weight_from_the_file(family, layout, files, cache):
    path = files(family, layout)
    assert weight_layout(path) == layout  # the most common layout of the blocks' matrices
    expected = {"blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight", **SPECIFIC[family]}
    # Gemma's norms are stored as 1 + w.
    lm, _, _ = _converted_from_file(
        path, cache, CLASSES[family], expected, lambda name: family.startswith("gemma") and "norm" in name
    )
    model = lm.model
    if family == "qwen3":  # the file's head size (transformers takes Qwen 3's default, the same)
        assert model.config.head_dim == 128
    windows = hf_cache.attention_windows(model)
    if family == "gemma2":  # alternate layers slide
        assert windows == (FAMILY_WINDOW, None)
    elif family == "gemma3":  # one layer in 6 is full
        assert windows == (FAMILY_WINDOW,) * 5 + (None,)
    else:
        assert windows is not None and set(windows) == {None}
    assert lm.supports_block_reuse


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_answers_at_the_files_bits_and_the_log_line_says_why(
    family, layout, files, cache, caplog
):
    path = files(family, layout)
    config = _config(path, cache, dtype="bfloat16", weight_quantization="auto")
    assert_served_at_file_bits(config, layout, SERVED_BITS[layout], caplog)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_quantized_file_decodes_through_the_native_layers(family, files, cache, monkeypatch):
    """A file served at 8 bits takes the one-call native decode layers for its decode rows, whatever
    its family differs from Llama in (q/k norms, Phi-3's fused projections, sliding windows, Gemma's
    norms and activation), and answers what it answers through the Python loop over the same
    decode attention."""
    from bulk.models import native

    real = native.decode_layers
    path = files(family, "Q8_0")
    config = _config(path, cache, dtype="bfloat16", weight_quantization="auto")
    answers = []
    for layers in (real, lambda: None):  # the native call, then none: the Python loop
        monkeypatch.setattr(native, "decode_layers", layers)
        with UltraAdaptiveKVCacheEngine(config) as engine:
            answers.append(engine.process_request_sync({**QUERY, "max_new_tokens": 12, "min_tokens": 12}))
            assert engine._loop is not None
            step = engine._loop.runner.plain_step
            assert step is not None and (step.native is not None) is (layers is real)
    assert answers[0]["result"] == answers[1]["result"] and answers[0]["completion_tokens"] == 12


def _prompt(i: int) -> str:
    words = ["the", "capital", "of", "France", "is", "Paris", "create", "marketing", "strategy"]
    return " ".join(words[(i + k * 3) % len(words)] for k in range(12 + i % 5))


@pytest.mark.parametrize(("family", "layout"), [("gemma2", "Q6_K"), ("gemma3", "Q4_K")])
async def test_sliding_window_families_batch_and_reuse_a_prefix(family, layout, files, cache):
    path = files(family, layout)
    config = _config(path, cache, dtype="float32", weight_quantization="none", block_size=4, max_batch_size=8)
    prompts = [_prompt(i) for i in range(8)]
    shared = "You are a helpful assistant. " + " ".join(_prompt(i) for i in range(3))
    warm, test = shared + " What is the capital of France?", shared + " Create marketing strategy."
    request = {"raw": True, "max_new_tokens": 6, "ignore_eos": True}
    with UltraAdaptiveKVCacheEngine(config) as engine:
        batched = await asyncio.gather(*(engine.process_request({**request, "query": p}) for p in prompts))
        assert engine._loop is not None  # (started by the first request)
        runner = engine._loop.runner
        assert runner.batched and runner.uses_pool  # sliding-window layers batch, through the pool
        stats = engine.get_stats()
        await engine.process_request({**request, "query": warm})
        reused = await engine.process_request({**request, "query": test})
        lm = engine.model
    assert stats["batch"]["max_batch_size"] >= 4  # decoded together
    solo = [generate_without_cache(lm, p, 6, ignore_eos=True).text for p in prompts]
    assert [r["result"] for r in batched] == solo  # each batched answer is its answer alone
    shared_tokens = len(lm.tokenizer.encode(shared))
    assert shared_tokens > 4 * FAMILY_WINDOW
    # The shared prefix's blocks (block_size 4) came from the cache, well past the window, and the
    # answer is the one computed from nothing.
    assert reused["cached_tokens"] >= shared_tokens - 2 * 4  # all but its last block or two
    assert reused["result"] == generate_without_cache(lm, test, 6, ignore_eos=True).text


@pytest.fixture(scope="module")
def hybrid_files(tmp_path_factory):
    pytest.importorskip("transformers.integrations.gguf.gguf_config_mapping")  # transformers 5's newer path
    made = {}

    def hybrid_file(family: str):
        if family not in made:
            layout = HYBRID_LAYOUT[family]
            path = tmp_path_factory.mktemp("gguf") / f"tiny-{family}.{layout}.gguf"
            made[family] = write_hybrid_gguf(path, family, layout)
        return made[family]

    return hybrid_file


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_each_hybrid_converts_with_every_weight_from_the_file(family, hybrid_files, cache):
    """transformers 5 reads these through `integrations.gguf` (its own config rebuild, renames and
    dequantization kernels), not the reader the other families go through: the converted folder must
    still hold the file's values, and the layer kinds the file states."""
    path = hybrid_files(family)
    assert weight_layout(path) == HYBRID_LAYOUT[family]
    # Qwen 3.5's norms are stored as 1 + w.
    lm, reader, params = _converted_from_file(
        path,
        cache,
        CLASSES[family],
        HYBRID_TENSORS[family],
        lambda name: family == "qwen35" and name in OFFSET,
    )
    model = lm.model
    if family == "lfm2":
        assert model.config.layer_types == list(LFM2_LAYER_KINDS)  # from the per-layer KV head counts
        kernel = params["model.layers.0.conv.conv.weight"].detach()
        assert torch.equal(kernel.squeeze(1), _dequantized(reader, "blk.0.shortconv.conv.weight"))
    else:
        assert model.config.layer_types == ["linear_attention", "full_attention"]
        # ssm_a holds -exp(A_log), its value heads in llama.cpp's tiled order
        a_log = params["model.layers.0.linear_attn.A_log"].detach()
        stored = torch.log(-_dequantized(reader, "blk.0.ssm_a"))
        assert torch.equal(a_log.sort().values, stored.sort().values)
    assert not lm.supports_block_reuse  # recurrent state is not a KV prefix


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_each_hybrid_answers_at_the_files_bits_one_request_at_a_time_saying_so(
    family, hybrid_files, cache, caplog
):
    """Served at the file's bits like the others, but a model whose layers are not all attention
    cannot share our batched attention: the log says it decodes one request at a time, and why."""
    path = hybrid_files(family)
    layout = HYBRID_LAYOUT[family]
    config = _config(path, cache, dtype="bfloat16", weight_quantization="auto")
    assert_served_at_file_bits(config, layout, SERVED_BITS[layout], caplog)
    one_at_a_time = [
        r.getMessage() for r in caplog.records if "decodes one request at a time" in r.getMessage()
    ]
    assert len(one_at_a_time) == 1
    assert "not all full or sliding-window attention" in one_at_a_time[0]


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
async def test_each_hybrid_answers_what_the_model_computes_from_nothing(family, hybrid_files, cache):
    """Requests sent together are served one at a time (the convolution / recurrent state lives in
    transformers' cache), each answer the one the model computes alone: through its own cache, and
    token by token over the whole sequence without any."""
    path = hybrid_files(family)
    config = _config(path, cache, dtype="float32", weight_quantization="none")
    prompts = [_prompt(i) for i in range(3)]
    request = {"raw": True, "max_new_tokens": 6, "ignore_eos": True}
    with UltraAdaptiveKVCacheEngine(config) as engine:
        answers = await asyncio.gather(*(engine.process_request({**request, "query": p}) for p in prompts))
        assert engine._loop is not None
        runner = engine._loop.runner
        assert not runner.batched and runner.max_batch_size == 1 and not runner.uses_pool
        lm = engine.model
    for prompt, answer in zip(prompts, answers, strict=True):
        solo = generate_without_cache(lm, prompt, 6, ignore_eos=True)
        assert answer["result"] == solo.text
        assert solo.token_ids == greedy_from_nothing(lm.model, lm.tokenizer.encode(prompt), 6)


@pytest.mark.parametrize("architecture", ["qwen35moe"])
def test_architectures_transformers_reads_through_its_newer_gguf_path_are_not_refused(architecture, tmp_path):
    """transformers 5 reads Qwen 3.5's MoE through `integrations.gguf`, not the older reader whose list
    `check_architecture` used to take as the whole; it must not be refused at start (Qwen 3.5 and LFM2
    load and answer above)."""
    pytest.importorskip("transformers.integrations.gguf.gguf_config_mapping")
    path = write_tiny_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture=architecture)
    check_architecture(path)  # does not raise

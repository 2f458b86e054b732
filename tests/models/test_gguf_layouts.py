"""GGUF files as users download them: transformer matrices in k-quants (Q4_K_M, Q5_K_M, Q6_K) or in
Q5_0 / Q5_1 / Q8_0, written by the tests (`tests/tiny_gguf.py`; the k-quant bytes by `tests/kquants.py`,
checked here against the `gguf` package's own reader). Each loads through `model="....gguf"`, holds the
file's values, answers the same greedy tokens twice, and with `weight_quantization="auto"` is served at
the file's bits, which the load log line names with the reason. (An architecture that cannot be served
is refused before conversion, with a message naming it: `test_gguf_architectures.py`.)"""

from __future__ import annotations

import json
import logging
import sys

import gguf
import numpy as np
import pytest
import torch

from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.models.gguf import MANIFEST, manifest_weights, weight_bits, weight_layout
from bulk.models.loader import load_model
from tests import kquants
from tests.tiny_gguf import QUERY, assert_served_at_file_bits, write_tiny_gguf
from tests.tiny_gguf import gguf_config as _config

# layout -> the bits `auto` serves it at
BITS = {"Q4_K": 4, "Q5_K": 8, "Q6_K": 8, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8}


@pytest.mark.parametrize("layout", ["Q4_K", "Q5_K", "Q6_K"])
def test_the_k_quant_encoder_is_the_inverse_of_ggufs_reader(layout):
    qtype = gguf.GGMLQuantizationType[layout]
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((6, 512)) * 0.08).astype(np.float32)
    data[1, :256] = np.abs(data[1, :256]) + 0.3  # a block whose minimum is above 0
    data[2, 256:] = 0.0  # an all-zero block
    data[3, :32] *= 40  # one sub-block far wider than the others
    encoded = kquants.quantize(data, qtype)
    assert encoded.dtype == np.uint8
    assert encoded.shape == (6, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    decoded = gguf.quants.dequantize(encoded, qtype)
    assert decoded.shape == data.shape
    assert np.all(decoded[2, 256:] == 0)
    # Within half a quantization step of each sub-block, plus what quantizing its scale (and minimum)
    # against the super-block's d (and dmin) can add, up to the clipping that causes: a wrong bit
    # layout is off by about the values themselves.
    group = 16 if layout == "Q6_K" else 32
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 31}[layout]
    sub = data.reshape(6, 2, -1, group)  # (rows, super-blocks, sub-blocks, values)
    if layout == "Q6_K":
        step = np.abs(sub).max(axis=-1) / levels
        slack = 16 * step.max(axis=-1, keepdims=True) / 127
    else:
        minimum = -np.minimum(sub.min(axis=-1), 0)
        step = (sub.max(axis=-1) + minimum) / levels
        d, dmin = step.max(axis=-1, keepdims=True) / 63, minimum.max(axis=-1, keepdims=True) / 63
        slack = (levels + 1) / 2 * d + dmin / 2
    error = np.abs(decoded - data).reshape(sub.shape)
    assert np.all(error <= (step / 2 + slack)[..., None] * 1.001 + 1e-6)
    # And the error is mostly rounding: well under a tenth of the values' spread.
    relative = np.sqrt(np.mean((decoded - data)[[0, 4, 5]] ** 2)) / data[[0, 4, 5]].std()
    assert relative < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}[layout]
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(data[:, :128], qtype)


@pytest.fixture(scope="module", params=list(BITS))
def layout_file(request, tmp_path_factory):
    layout = request.param
    return layout, write_tiny_gguf(tmp_path_factory.mktemp("gguf") / f"tiny.{layout}.gguf", layout=layout)


def test_each_layout_loads_with_the_files_values_and_answers_deterministically(layout_file, tmp_path):
    layout, path = layout_file
    assert weight_layout(path) == layout  # the most common layout of the blocks' matrices
    assert weight_bits(path) == BITS[layout]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if layout in ("Q4_K", "Q5_K"):  # written as llama.cpp's _M mixes
        assert types["blk.0.ffn_down.weight"] == types["output.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == layout

    config = _config(path, tmp_path, dtype="float32", weight_quantization="none")
    with UltraAdaptiveKVCacheEngine(config) as engine:
        first = engine.process_request_sync(QUERY)
        second = engine.process_request_sync(QUERY)
        model = engine.model.model
    # The converted weights are the file's blocks as the `gguf` package reads them.
    stored = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy())
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight.detach(), expected)
    assert first["completion_tokens"] > 0
    assert (first["result"], first["completion_tokens"]) == (second["result"], second["completion_tokens"])


def test_auto_serves_the_files_bits_and_the_log_line_says_why(layout_file, tmp_path, caplog):
    layout, path = layout_file
    config = _config(path, tmp_path, dtype="bfloat16", weight_quantization="auto")
    assert_served_at_file_bits(config, layout, BITS[layout], caplog)


def test_a_file_served_dequantized_says_why(tmp_path, caplog):
    path = write_tiny_gguf(tmp_path / "tiny.Q4_K.gguf", layout="Q4_K")
    with caplog.at_level(logging.INFO, logger="bulk.models.loader"):
        lm = load_model(_config(path, tmp_path / "m", dtype="float32", weight_quantization="auto"))
        explicit = load_model(_config(path, tmp_path / "m", weight_quantization="int8"))
    assert (lm.weight_quantization, explicit.weight_quantization) == ("none", "int8")
    why = "weights unquantized: the file's blocks are Q4_K, dequantized because the model runs in float32"
    assert why in caplog.text
    assert "weights int8: weight_quantization=int8" in caplog.text


def test_a_folder_converted_before_the_layout_was_recorded_gets_it(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.Q4_K.gguf", layout="Q4_K")
    load_model(_config(path, tmp_path / "m", dtype="float32"))
    folder = next((tmp_path / "m").iterdir())
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (manifest["weight_layout"], manifest["weight_bits"]) == ("Q4_K", 4)
    del manifest["weight_layout"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, "gguf", None)  # without the package: the bits it has
        assert manifest_weights(folder, path) == (None, 4)
    assert manifest_weights(folder, path) == ("Q4_K", 4)
    assert json.loads((folder / MANIFEST).read_text())["weight_layout"] == "Q4_K"

"""Every call into transformers' cache API lives here, and nowhere else.

transformers renames its cache arguments often (`past_key_values` became `cache` in 5.24, `crop`
changed meaning, legacy tuple formats went away in 5.0). The rest of BUL KV speaks in plain tensors:

    block  # (layers, 2, kv_heads, block_size, head_dim): keys at [:, 0], values at [:, 1]

and this module converts between those and whatever cache object the installed transformers wants.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# The forward keyword for the cache: "cache" from transformers 5.24 on, "past_key_values" before.
_kwarg_by_class: dict[type, str] = {}


def _cache_kwarg(model: Any) -> str:
    cls = type(model)
    if cls not in _kwarg_by_class:
        params = inspect.signature(model.forward).parameters
        _kwarg_by_class[cls] = "cache" if "cache" in params else "past_key_values"
    return _kwarg_by_class[cls]


def _output_cache(output: Any) -> Any:
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def attention_windows(model: Any) -> tuple[int | None, ...] | None:
    """Each layer's attention as transformers' cache for the model lays it out: None for full
    attention, W for a sliding window of W tokens (a query at position i sees keys i - W + 1 to i);
    None for a model with another kind of layer (recurrent state, chunked attention), whose state no
    concatenation of KV blocks can rebuild."""
    # transformers lays chunked attention (Llama 4's) out as sliding-window layers too: the layer
    # types tell them apart.
    kinds = set(getattr(model.config, "layer_types", None) or ())
    if not kinds <= {"full_attention", "sliding_attention"}:
        return None
    windows: list[int | None] = []
    for layer in DynamicCache(config=model.config).layers:
        kind = type(layer).__name__
        if kind == "DynamicLayer":
            windows.append(None)
        elif kind == "DynamicSlidingWindowLayer":
            windows.append(int(cast(Any, layer).sliding_window))
        else:
            return None
    return tuple(windows)


def supports_block_reuse(model: Any) -> bool:
    """KV blocks can be stored and reused: every layer is full or sliding-window attention. The pool
    keeps every layer's KV for every token (a sliding layer's too, beyond its window), so a prefix's
    blocks rebuild any layer's state exactly; attention applies each layer's window
    (`batched_attention.attend`). transformers' own cache can be rebuilt from blocks only for plain
    attention (`plain_attention`): a sliding-window model reuses blocks only when it batches."""
    return attention_windows(model) is not None


def plain_attention(model: Any) -> bool:
    """Every layer is full attention: transformers' own cache can be built over the pool's blocks."""
    windows = attention_windows(model)
    return windows is not None and all(window is None for window in windows)


class _BufferedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into a buffer sized once for the request.

    `DynamicLayer.update` concatenates, copying the layer's whole cache on every forward: at 2048
    cached tokens that is most of a decode step's memory traffic. Here an update writes only the new
    tokens. The buffer doubles if a request outgrows it."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.capacity, head_dim)
        self._adopt(
            torch.empty(shape, dtype=key_states.dtype, device=key_states.device),
            torch.empty(shape, dtype=value_states.dtype, device=value_states.device),
            length=0,
        )

    def _adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        self.device = key_buffer.device
        self._key_buffer, self._value_buffer = (
            key_buffer,
            value_buffer,
        )  # (batch, kv_heads, capacity, head_dim)
        self.capacity, self.length = key_buffer.shape[2], length
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            # What the layer holds: the first `length` tokens of the old buffers (`self.keys` views them).
            keys, values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]
            self.capacity = max(end, 2 * self.capacity)
            self.lazy_initialization(key_states, value_states)
            self._key_buffer[:, :, : keys.shape[2]] = keys
            self._value_buffer[:, :, : values.shape[2]] = values
            self.length = keys.shape[2]
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys is not None:
            self.length = self.keys.shape[2]

    def reset(self) -> None:
        super().reset()
        self.length = 0


def new_cache(model: Any, capacity: int = 0) -> DynamicCache:
    """An empty cache. With `capacity` (prompt plus new tokens), its layers write into buffers of that
    size instead of growing by concatenation; only for models whose layers are all plain attention."""
    cache = DynamicCache(config=model.config)
    if capacity > 0 and plain_attention(model):
        cache.layers = [_BufferedLayer(capacity) for _ in cache.layers]
    return cache


def cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


@torch.inference_mode()
def forward(model: Any, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """Run `input_ids` (1, n) on top of `cache`; return the last position's logits (vocab,) and the
    grown cache. Only the last position's logits are computed: prefill never needs the others."""
    if cache is None:
        cache = new_cache(model)
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return output.logits[0, -1], _output_cache(output)


@torch.inference_mode()
def forward_all(model: Any, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """Run `input_ids` (rows, n) on top of `cache`; the logits of every position of every row,
    (rows, n, vocab), for scoring text (perplexity), and the grown cache."""
    if cache is None:
        cache = new_cache(model)
    output = model(input_ids=input_ids, use_cache=True, **{_cache_kwarg(model): cache})
    return output.logits, _output_cache(output)


def _buffered(cache: DynamicCache) -> list[_BufferedLayer]:
    """The layers of a cache `new_cache` built (transformers types them as its base classes)."""
    return cast("list[_BufferedLayer]", cache.layers)


def cache_on_buffer(model: Any, buffer: torch.Tensor, length: int) -> DynamicCache:
    """A cache whose layers read and write `buffer` in place, (layers, 2, kv_heads, capacity,
    head_dim) (a request's range of the KV pool), holding its first `length` tokens already."""
    cache = new_cache(model, capacity=buffer.shape[3])
    for i, layer in enumerate(_buffered(cache)):
        layer._adopt(buffer[i, 0].unsqueeze(0), buffer[i, 1].unsqueeze(0), length=length)
    return cache


def cache_from_blocks(
    model: Any, blocks: Sequence[torch.Tensor], num_tokens: int | None = None, capacity: int = 0
) -> DynamicCache:
    """A cache holding the first `num_tokens` (default: all) tokens of the concatenated `blocks`, each
    (layers, 2, kv_heads, block, head_dim), with room for `capacity` tokens in all (see `new_cache`).

    The reused KV is copied once, block by block, into one buffer shared by every layer. (The engine
    copies into its KV pool instead; this serves tests and benchmarks.)"""
    blocks = list(blocks)
    total = sum(b.shape[3] for b in blocks)
    num_tokens = total if num_tokens is None else num_tokens
    if not 0 <= total - num_tokens < (blocks[-1].shape[3] if blocks else 1):
        raise ValueError(f"num_tokens={num_tokens} must keep all but part of the last of {total} tokens")
    capacity = max(capacity, num_tokens)
    cache = new_cache(model, capacity)
    buffered = bool(cache.layers) and isinstance(cache.layers[0], _BufferedLayer)
    if not blocks:
        return cache  # the layers allocate on their first update
    layers, _, kv_heads, _, head_dim = blocks[0].shape
    shape = (layers, 2, 1, kv_heads, capacity, head_dim)
    buffer = torch.empty(shape, dtype=blocks[0].dtype, device=blocks[0].device)
    start = 0
    for block in blocks:
        take = min(block.shape[3], num_tokens - start)
        buffer[:, :, 0, :, start : start + take] = block[:, :, :, :take]
        start += take
    if buffered:
        for i, layer in enumerate(_buffered(cache)):
            layer._adopt(buffer[i, 0], buffer[i, 1], length=num_tokens)
        return cache
    # A model whose cache layers are not plain attention never gets here (no blocks are stored for
    # it), but keep the general path correct: hand transformers the tensors.
    per_layer = [
        (buffer[i, 0, :, :, :num_tokens], buffer[i, 1, :, :, :num_tokens]) for i in range(buffer.shape[0])
    ]
    return DynamicCache(ddp_cache_data=per_layer, config=model.config)


def cache_from_block_rows(model: Any, rows: Sequence[Sequence[torch.Tensor]], capacity: int) -> DynamicCache:
    """A cache of `len(rows)` sequences side by side (its batch dimension): row r holds the
    concatenated `rows[r]` blocks, each (layers, 2, kv_heads, block, head_dim), every row the same
    number of tokens, with room for `capacity` tokens per row. For scoring several texts in one
    forward (benchmarks); only for models whose layers are all plain attention."""
    lengths = {sum(b.shape[3] for b in row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"every row must hold as many tokens (got {sorted(lengths)})")
    if not plain_attention(model):
        raise ValueError("the model's cache layers are not all plain full attention")
    (length,) = lengths
    cache = new_cache(model, max(capacity, length, 1))
    if length == 0:
        return cache  # the layers allocate on their first update, one row per input row
    layers, _, kv_heads, _, head_dim = rows[0][0].shape
    shape = (layers, 2, len(rows), kv_heads, max(capacity, length), head_dim)
    buffer = torch.empty(shape, dtype=rows[0][0].dtype, device=rows[0][0].device)
    for r, row in enumerate(rows):
        start = 0
        for block in row:
            buffer[:, :, r, :, start : start + block.shape[3]] = block
            start += block.shape[3]
    for i, layer in enumerate(_buffered(cache)):
        layer._adopt(buffer[i, 0], buffer[i, 1], length=length)
    return cache


def blocks_from_cache(cache: Any, start: int, stop: int, block_size: int, row: int = 0) -> list[torch.Tensor]:
    """Copies of the KV for tokens [start, stop) of the cache's `row` as blocks, each (layers, 2,
    kv_heads, block, head_dim). `stop - start` must be a multiple of `block_size`."""
    if (stop - start) % block_size:
        raise ValueError(f"range {start}:{stop} is not a whole number of {block_size}-token blocks")
    if stop <= start:
        return []
    kv = torch.stack(
        [
            torch.stack((layer.keys[row, :, start:stop], layer.values[row, :, start:stop]))
            for layer in cache.layers
        ]
    )  # (layers, 2, kv_heads, stop - start, head_dim), a fresh tensor
    # clone() so each block owns its memory: evicting one block must free it.
    return [b.clone() for b in kv.split(block_size, dim=3)]


def copy_cache(cache: Any) -> Any:
    """A deep copy: Hugging Face's documented way to reuse one prefix cache across requests."""
    return copy.deepcopy(cache)


@torch.inference_mode()
def hf_generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, cache: Any = None) -> torch.Tensor:
    """Greedy `model.generate`, optionally on top of a precomputed prefix cache (the benchmarks'
    baseline; the engine never calls it)."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    attention_mask = torch.ones_like(input_ids)
    return model.generate(input_ids, attention_mask=attention_mask, **kwargs)


@torch.inference_mode()
def hf_generate_batch(
    model: Any,
    inputs: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    num_blocks: int,
    max_batch_tokens: int,
    max_requests: int,
) -> list[list[int]]:
    """Greedy answers from transformers' own continuous batching (`generate_batch`), for the
    benchmarks' offline baseline; the engine never calls it. On a CPU it needs `num_blocks` (its KV
    pool, in pages of 256 tokens) and `max_batch_tokens` set: it would otherwise size its pool from
    GPU memory. `max_requests`: requests decoded at once. It leaves state behind on the model, so
    run it in a process of its own."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    batching = ContinuousBatchingConfig(
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        use_cuda_graph=False,
        use_async_batching=False,
    )
    outputs = model.generate_batch(
        inputs=inputs, generation_config=generation, continuous_batching_config=batching, progress_bar=False
    )
    failed = [o.error for o in outputs.values() if o.error]
    if failed:
        raise RuntimeError(f"generate_batch failed: {failed[0]}")
    by_id = {o.request_id: o.generated_tokens for o in outputs.values()}
    return [by_id[f"req_{i}"] for i in range(len(inputs))]

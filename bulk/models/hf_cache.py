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
from typing import Any

import torch
from transformers import DynamicCache

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


def supports_block_reuse(model: Any) -> bool:
    """Reusing KV blocks needs plain full-attention layers: a sliding-window or recurrent layer keeps
    state that a concatenation of blocks cannot rebuild."""
    layers = DynamicCache(config=model.config).layers
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def new_cache(model: Any) -> DynamicCache:
    return DynamicCache(config=model.config)


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


def cache_from_blocks(
    model: Any, blocks: Sequence[torch.Tensor], num_tokens: int | None = None
) -> DynamicCache:
    """A cache holding the first `num_tokens` (default: all) tokens of the concatenated `blocks`,
    each (layers, 2, kv_heads, block, head_dim).

    One copy: the blocks are concatenated once along the token axis, and each layer's keys and values
    are views into that tensor. (`DynamicCache(ddp_cache_data=...)` would copy everything a second
    time, by concatenating onto an empty tensor.)"""
    cache = new_cache(model)
    if not blocks:
        return cache
    blocks = list(blocks)
    total = sum(b.shape[3] for b in blocks)
    if num_tokens is not None and num_tokens < total:
        cut = blocks[-1].shape[3] - (total - num_tokens)
        if cut < 0:
            raise ValueError(f"num_tokens={num_tokens} drops more than the last block")
        blocks[-1] = blocks[-1][:, :, :, :cut]
    kv = torch.cat(blocks, dim=3)  # (layers, 2, kv_heads, tokens, head_dim)
    per_layer = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])]
    try:
        for layer, (keys, values) in zip(cache.layers, per_layer, strict=True):
            layer.lazy_initialization(keys, values)  # (1, kv_heads, tokens, head_dim)
            layer.keys, layer.values = keys, values
    except TypeError:  # a transformers release whose layers initialise differently: take the copy
        return DynamicCache(ddp_cache_data=per_layer, config=model.config)
    return cache


def blocks_from_cache(cache: Any, start: int, stop: int, block_size: int) -> list[torch.Tensor]:
    """Copies of the KV for tokens [start, stop) as blocks, each (layers, 2, kv_heads, block, head_dim).
    `stop - start` must be a multiple of `block_size`."""
    if (stop - start) % block_size:
        raise ValueError(f"range {start}:{stop} is not a whole number of {block_size}-token blocks")
    if stop <= start:
        return []
    kv = torch.stack(
        [
            torch.stack((layer.keys[0, :, start:stop], layer.values[0, :, start:stop]))
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

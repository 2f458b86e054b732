"""One decode step for many requests: input (B, 1), a position per row, each row attending to its own
KV range of the pool. The only place that plugs into transformers' attention.

transformers computes projections, rotary embeddings, norms and the MLP for the whole (B, 1) batch,
one GEMM per weight for all rows, which is where batching pays: decode reads every weight once per
step instead of once per request. Attention is the one part that differs per row (each request has
its own length), so a custom function registered through `AttentionInterface` takes it over: it
writes each row's new key and value into the pool (one `index_copy_` per layer) and runs one SDPA
per row over that row's contiguous keys and values. One SDPA per row was faster on CPU than one
padded, masked SDPA over all rows, and it is the same call a request running alone makes, so a
row's attention is exactly its solo attention. (On CUDA, `flash_attn_with_kvcache` over the pool
would do all rows in one kernel: a later step.)

Calls that carry no `DecodeBatch` (prefill, transformers' own `generate`) go to transformers' SDPA
attention unchanged, with the SDPA mask function registered beside ours: an implementation
registered without a mask function gets no causal mask at all.

    pool    # (layers, 2, kv_heads, pool_tokens, head_dim)
    query   # (rows, heads, 1, head_dim), after rotary
    key     # (rows, kv_heads, 1, head_dim), after rotary: the new token's
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bulk.models import hf_cache

log = logging.getLogger(__name__)

ATTENTION = "bul_rows"
_BATCH_KWARG = "bul_decode_batch"
# Implementations whose numerics ours reproduces for prefill (it delegates to SDPA).
_REPLACEABLE = ("sdpa", "eager", None)


@dataclass(frozen=True)
class DecodeBatch:
    """What the attention function needs to know about the rows of one decode step."""

    pool: torch.Tensor  # (layers, 2, kv_heads, pool_tokens, head_dim)
    starts: list[int]  # each real row's range start in the pool
    lengths: list[int]  # tokens each row holds before this step: the new token's position
    write_at: torch.Tensor  # (rows,) long, starts + lengths: where the new keys and values go


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch: DecodeBatch | None = kwargs.pop(_BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = batch.pool[module.layer_idx]  # (2, kv_heads, pool_tokens, head_dim)
    rows = len(batch.starts)
    layer[0].index_copy_(1, batch.write_at, key[:rows, :, 0].transpose(0, 1))
    layer[1].index_copy_(1, batch.write_at, value[:rows, :, 0].transpose(0, 1))
    outputs = []
    for row, (start, length) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
        end = start + length + 1
        out, _ = sdpa_attention_forward(
            module,
            query[row : row + 1],
            layer[0, :, start:end].unsqueeze(0),
            layer[1, :, start:end].unsqueeze(0),
            None,
            **kwargs,
        )
        outputs.append(out)  # (1, 1, heads, head_dim)
    padding = query.shape[0] - rows
    if padding:
        # Rows added only to fix the GEMM shape (batch-invariant mode): their output is never read.
        outputs.append(outputs[0].new_zeros((padding, *outputs[0].shape[1:])))
    return torch.cat(outputs), None


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def enable(model: Any) -> str | None:
    """Route `model`'s attention through ours; None when it worked, else why decode cannot be
    batched this way (the caller then decodes one request at a time)."""
    if not hf_cache.supports_block_reuse(model):
        return "its cache layers are not all plain full attention (sliding window or recurrent)"
    current = getattr(model.config, "_attn_implementation", None)
    if current == ATTENTION:
        return None
    if current not in _REPLACEABLE:
        return f"it runs {current!r} attention, which ours would replace"
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if len(attention) != model.config.num_hidden_layers:
        return "its attention modules do not follow transformers' functional attention interface"
    try:
        model.set_attn_implementation(ATTENTION)
    except Exception as exc:  # transformers raises several kinds for models that refuse
        return f"transformers refused a custom attention function ({exc})"
    if model.config._attn_implementation != ATTENTION:
        return "it does not support setting its attention implementation"
    return None


@torch.inference_mode()
def decode_step(model: Any, tokens: list[int], batch: DecodeBatch, rows: int | None = None) -> torch.Tensor:
    """Feed one token per request; returns their next-token logits (len(tokens), vocab). `rows` pads
    the batch to that many rows (batch-invariant mode: every GEMM then runs at a shape whose kernel
    gives each row the same bits whatever the other rows hold)."""
    n = len(tokens)
    rows = max(rows or n, n)
    device = batch.pool.device
    ids = torch.tensor(tokens + [0] * (rows - n), dtype=torch.long, device=device).view(rows, 1)
    positions = torch.tensor(batch.lengths + [0] * (rows - n), dtype=torch.long, device=device).view(rows, 1)
    output = model(input_ids=ids, position_ids=positions, use_cache=False, **{_BATCH_KWARG: batch})
    return output.logits[:n, -1]  # (n, vocab)


def decode_batch(pool: torch.Tensor, starts: list[int], lengths: list[int]) -> DecodeBatch:
    write_at = torch.tensor([s + n for s, n in zip(starts, lengths, strict=True)], device=pool.device)
    return DecodeBatch(pool, starts, lengths, write_at)


# ---- batch invariance ---------------------------------------------------------------------------

ROW_MULTIPLE = 4


def pad_rows(n: int) -> int:
    """`n` rows rounded up to a multiple of `ROW_MULTIPLE` (at least one multiple)."""
    return max(ROW_MULTIPLE, -(-n // ROW_MULTIPLE) * ROW_MULTIPLE)


def invariant_rows(model: Any, max_rows: int) -> Callable[[int], int] | None:
    """How to pad decode batches so that a row's logits never depend on the batch: a function from
    the rows of a step to the rows to run, or None when no padding makes this machine's GEMMs give
    a row the same bits at every batch size and position.

    On CPU, BLAS picks its GEMM kernel by shape: 1-3 rows run other kernels than 4 or more (which
    changes a row's last bits), and with some thread counts 5-7 and 9-11 rows differ again while
    every multiple of 4 agrees. The choice belongs to the BLAS build and the thread count, so it is
    checked here, on this machine, on every weight shape of the model: rows of a random input, in
    random order, must come out bit-identical at every padded size. When some size disagrees,
    every step runs at the largest size, if at least that size is free of position effects."""
    sizes = list(range(ROW_MULTIPLE, pad_rows(max_rows) + 1, ROW_MULTIPLE))
    largest = sizes[-1]
    if _rows_agree(model, sizes):
        return pad_rows
    if _rows_agree(model, [largest]):
        log.info(
            "batch-invariant mode: GEMMs of different row counts disagree on this machine; every "
            "decode step runs at %d rows",
            largest,
        )
        return lambda n: largest
    return None


def _rows_agree(model: Any, sizes: list[int]) -> bool:
    generator = torch.Generator(device="cpu").manual_seed(0)
    largest = sizes[-1]
    seen: set[tuple[int, ...]] = set()
    with torch.inference_mode():
        for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            weight = linear.weight
            if tuple(weight.shape) in seen:
                continue
            seen.add(tuple(weight.shape))
            x = torch.randn((largest, weight.shape[1]), generator=generator).to(weight.device, weight.dtype)
            full = F.linear(x, weight, linear.bias)
            for size in sizes:
                # Some rows of the input, in another order: a row's bits must depend neither on the
                # batch's size nor on where the row sits in it.
                rows = torch.randperm(largest, generator=generator)[:size].to(weight.device)
                if not torch.equal(F.linear(x[rows], weight, linear.bias), full[rows]):
                    return False
    return True

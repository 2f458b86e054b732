"""One forward for a whole step of many requests: their tokens side by side in one sequence
`(1, N)`, each with its own position, each request attending to its own KV range of the pool. The
only place that plugs into transformers' attention.

A step holds segments: one token for each decoding request, and a chunk of prompt for each request
being prefilled. transformers computes projections, rotary embeddings, norms and the MLP for all N
tokens at once, one GEMM per weight, which is where batching pays: a step reads every weight once,
however many requests it serves (as vLLM and SGLang lay out their batches). Attention is the one
part that differs per segment, so a custom function registered through `AttentionInterface` takes
it over: it writes every new key and value into the pool (one `index_copy_` per layer) and runs one
SDPA per prompt chunk over that request's contiguous keys and values, with a causal mask offset by
the tokens it already holds, and the decode rows (one new token each, after the chunks) in one call
of the native decode attention where it is built (`bulk.models.native.decode_attention`: every
row's keys and values read once, the rows spread over the threads), else one SDPA per row. Each
row's attention is computed on its own, the same way whatever runs beside it, so a request's
attention is exactly its solo attention. One SDPA per
segment was faster on CPU than one padded, masked SDPA over all rows. (On CUDA,
`flash_attn_with_kvcache` over the pool would do all decode rows in one kernel: a later step.)

Calls that carry no `StepBatch` (transformers' own `generate`, the benchmarks' baselines) go to
transformers' SDPA attention unchanged, with the SDPA mask function registered beside ours: an
implementation registered without a mask function gets no causal mask at all.

    pool    # (layers, 2, kv_heads, pool_tokens, head_dim)
    query   # (1, heads, N, head_dim), after rotary
    key     # (1, kv_heads, N, head_dim), after rotary: the step's new tokens
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bulk.models import cpu, hf_cache

log = logging.getLogger(__name__)

ATTENTION = "bul_rows"
_BATCH_KWARG = "bul_step_batch"
# Implementations whose numerics ours reproduces for prefill (it delegates to SDPA).
_REPLACEABLE = ("sdpa", "eager", None)
# transformers' SDPA attention lets SDPA group query heads over key heads (`enable_gqa`) for head
# sizes up to this (`use_gqa_in_sdpa`); a decode row calls SDPA the same way.
GQA_HEAD_DIM = 256


@dataclass(frozen=True)
class Segment:
    """One request's tokens in a step: `length` new tokens after the `cached` its range holds."""

    start: int  # its range's start in the pool
    cached: int  # tokens its range holds before this step (the first new token's position)
    length: int  # new tokens in this step: 1 for a decode row, a chunk for a prefill


# (query (1, heads, rows, head_dim), layer (2, kv_heads, pool_tokens, head_dim), starts, ends,
# scaling, in float32, soft-cap or 0) -> (1, rows, heads, head_dim): `bulk.models.native.decode_attention`
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, list[int], list[int], float, bool, float], torch.Tensor
]
# (query (1, heads, length, head_dim), layer, first, end, position, window or 0, scaling) ->
# (1, length, heads, head_dim): `bulk.models.native.prompt_attention`, for bfloat16 chunks
PromptAttention = Callable[[torch.Tensor, torch.Tensor, int, int, int, int, float], torch.Tensor]
# Head sizes the native prompt attention takes (its tiles hold 64 dims of the values at a time).
PROMPT_KERNEL_HEAD_DIMS = 64


@dataclass(frozen=True)
class StepBatch:
    """What the attention function needs to know about the segments of one step."""

    pool: torch.Tensor  # (layers, 2, kv_heads, pool_tokens, head_dim)
    segments: Sequence[Segment]
    write_at: torch.Tensor  # (tokens,) long: the pool position of each new key and value
    masks: tuple[torch.Tensor | None, ...]  # per segment: its causal mask, or None (SDPA's own)
    # The decode rows at the end of the step (from segment `rows_from` on), each over the pool range
    # [row_starts[i], row_ends[i]): in one call of `decode_attention` when given, else SDPA per row.
    decode_attention: DecodeAttention | None = None
    rows_from: int = 0
    row_starts: list[int] = field(default_factory=list)
    row_ends: list[int] = field(default_factory=list)
    # The prompt chunks of a bfloat16 model in one native call each, where given; else SDPA's.
    prompt_attention: PromptAttention | None = None


def step_batch(
    pool: torch.Tensor,
    segments: Sequence[Segment],
    decode_attention: DecodeAttention | None = None,
    rows_from: int | None = None,
    prompt_attention: PromptAttention | None = None,
) -> StepBatch:
    """The step's batch. `segments[rows_from:]` are decode rows (each the one token the model
    produced last; default: none), which go to `decode_attention` when given. A one-token prompt
    chunk (a prompt whose every other token was cached) is not a decode row: it is computed as
    SDPA computes the last token of a prompt, so that reusing a prefix changes nothing but speed.
    Prompt chunks go to `prompt_attention` where given and their dtype and heads fit it (a query's
    output there is the same bits in a chunk of any length, the one-token chunk included)."""
    positions: list[int] = []
    masks: list[torch.Tensor | None] = []
    for seg in segments:
        first = seg.start + seg.cached
        positions.extend(range(first, first + seg.length))
        masks.append(_offset_causal_mask(seg, pool.device))
    write_at = torch.tensor(positions, dtype=torch.long, device=pool.device)
    rows_from = len(segments) if rows_from is None else rows_from
    rows = segments[rows_from:]
    if any(seg.length != 1 for seg in rows):
        raise ValueError("a decode row holds one new token")
    if pool.device.type != "cpu":
        decode_attention = prompt_attention = None  # CPU code
    return StepBatch(
        pool,
        segments,
        write_at,
        tuple(masks),
        decode_attention,
        rows_from,
        [seg.start for seg in rows],
        [seg.start + seg.cached + 1 for seg in rows],
        prompt_attention,
    )


def _window_mask(seg: Segment, window: int, skip: int, device: torch.device) -> torch.Tensor | None:
    """(1, 1, length, cached + length - skip) bool, True where a new token may attend in a layer with
    a sliding window: causal, and at most `window` keys back (transformers' sliding-window mask: key
    j is seen from position i when i - window < j <= i), over the keys from position `skip` on.
    None for one query (it sees every key it is given)."""
    if seg.length == 1:
        return None
    rows = torch.arange(seg.length, device=device).unsqueeze(1) + seg.cached
    cols = torch.arange(skip, seg.cached + seg.length, device=device).unsqueeze(0)
    allowed = (cols <= rows) & (cols > rows - window)
    return allowed.view(1, 1, seg.length, seg.cached + seg.length - skip)


def _offset_causal_mask(seg: Segment, device: torch.device) -> torch.Tensor | None:
    """(1, 1, length, cached + length) bool, True where a new token may attend: the mask
    transformers builds for a chunk on top of a cache. None where SDPA needs none: one token sees
    everything, and a chunk with nothing cached is plainly causal (SDPA's `is_causal`)."""
    if seg.length == 1 or seg.cached == 0:
        return None
    rows = torch.arange(seg.length, device=device).unsqueeze(1) + seg.cached
    cols = torch.arange(seg.cached + seg.length, device=device).unsqueeze(0)
    return (cols <= rows).view(1, 1, seg.length, seg.cached + seg.length)


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch: StepBatch | None = kwargs.pop(_BATCH_KWARG, None)
    if batch is None:
        if kwargs.get("softcap") is not None:  # SDPA refuses soft-capped scores
            return _eager_call(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = batch.pool[module.layer_idx]  # (2, kv_heads, pool_tokens, head_dim)
    write_kv(layer, batch, torch.cat((key, value), dim=1))
    # The layer's sliding window, as the model's attention module passes it (None: full attention).
    window = kwargs.pop("sliding_window", None)
    return attend(module, query, layer, batch, window=window, **kwargs), None


def write_kv(layer: torch.Tensor, batch: StepBatch, kv: torch.Tensor) -> None:
    """Write the step's new keys and values into the layer's pool, each at its request's position,
    with one copy. layer: (2, kv_heads, pool_tokens, head_dim); kv: (1, 2 * kv_heads, N, head_dim),
    the key heads then the value heads (the order of the layer's first two dimensions)."""
    tokens = batch.write_at.shape[0]
    heads = layer.view(-1, *layer.shape[2:])  # (2 * kv_heads, pool_tokens, head_dim)
    # A float32 pool under a half-precision model (`pool_dtype`) takes the keys and values exactly.
    heads.index_copy_(1, batch.write_at, kv[0, :, :tokens].to(layer.dtype))


def attend(
    module: Any,
    query: torch.Tensor,
    layer: torch.Tensor,
    batch: StepBatch,
    window: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Each segment's queries over its request's keys and values in the pool (after `write_kv`):
    one SDPA per prompt chunk, as transformers' SDPA attention runs it (or one
    `batch.prompt_attention` call, for bfloat16 chunks on CPUs with AMX or AVX512-BF16), and the
    decode rows at the end in one `batch.decode_attention` call where the batch has one, else one
    SDPA each. A layer with a sliding `window` of W tokens: each query sees only its last W keys
    (the keys before them are left out of the call, and a chunk's mask also ends each row's window).
    query: (1, heads, N, head_dim); returns (1, N, heads, head_dim)."""
    tokens = batch.write_at.shape[0]
    outputs = []
    offset = 0
    float32 = layer.dtype == torch.float32 or attends_in_float32(query.dtype, query.device)
    work = torch.float32 if float32 else query.dtype
    # Soft-capped scores (Gemma 2's `attn_logit_softcapping`) are no SDPA's: such a layer runs the
    # model's own eager attention, per prompt chunk, and for the decode rows in one padded call.
    softcap = kwargs.get("softcap")
    # Soft-capped decode rows go to the native decode attention too (it caps each score as the
    # eager attention does); without it, through the eager attention in one padded call.
    native_rows = batch.decode_attention is not None
    eager_rows = softcap is not None and not native_rows and batch.rows_from < len(batch.segments)
    sdpa_to = batch.rows_from if native_rows or eager_rows else len(batch.segments)
    segments, masks = batch.segments[:sdpa_to], batch.masks[:sdpa_to]
    kernel = batch.prompt_attention
    # The kernel computes bfloat16 chunks itself, whatever SDPA would have been given (`work`).
    if kernel is not None and not (
        softcap is None
        and query.dtype == layer.dtype == torch.bfloat16
        and query.shape[-1] % PROMPT_KERNEL_HEAD_DIMS == 0
    ):
        kernel = None
    for seg, mask in zip(segments, masks, strict=True):
        end = seg.start + seg.cached + seg.length
        first = seg.start
        if window is not None and seg.cached + seg.length > window:
            # Keys before the chunk's first query's window are seen by none of its queries.
            skip = max(0, seg.cached - window + 1)
            first += skip
            mask = _window_mask(seg, window, skip, query.device)
        if kernel is not None:  # a one-token chunk too: a row computes the same bits alone or in a chunk
            scaling = kwargs.get("scaling")
            outputs.append(
                kernel(
                    query[:, :, offset : offset + seg.length], layer, first, end, seg.start + seg.cached,
                    window or 0, module.scaling if scaling is None else scaling,
                )
            )  # fmt: skip
            offset += seg.length
            continue
        q = query[:, :, offset : offset + seg.length].to(work)
        k = layer[0, :, first:end].unsqueeze(0).to(work)  # no copy when the pool holds `work`
        v = layer[1, :, first:end].unsqueeze(0).to(work)
        if softcap is not None:
            out = _eager(module, q, k, v, mask, **kwargs)
        elif seg.length == 1 and k.shape[-1] <= GQA_HEAD_DIM:
            # A decode row: the SDPA call transformers' SDPA attention makes for one query and no
            # mask, without its checks (a few microseconds a layer, a row, a step).
            out = F.scaled_dot_product_attention(
                q, k, v, scale=kwargs.get("scaling"), enable_gqa=q.shape[1] != k.shape[1]
            ).transpose(1, 2)
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outputs.append(out.to(query.dtype))  # (1, length, heads, head_dim)
        offset += seg.length
    if eager_rows:
        rows = query[:, :, offset : offset + len(batch.row_starts)].to(work)
        outputs.append(_eager_rows(module, rows, layer, batch, window, **kwargs).to(query.dtype))
    if native_rows and batch.row_starts:
        assert batch.decode_attention is not None
        rows = query[:, :, offset : offset + len(batch.row_starts)]
        scaling = kwargs.get("scaling")
        scaling = module.scaling if scaling is None else scaling
        starts = batch.row_starts
        if window is not None:
            starts = [max(start, end - window) for start, end in zip(starts, batch.row_ends, strict=True)]
        outputs.append(
            batch.decode_attention(rows, layer, starts, batch.row_ends, scaling, float32, softcap or 0.0)
        )
    padding = query.shape[2] - tokens
    if padding:
        # Tokens added only to fix the GEMM shape (batch-invariant mode): their output is never read.
        outputs.append(outputs[0].new_zeros((1, padding, *outputs[0].shape[2:])))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _eager(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """One segment through the model's own eager attention function (its module's
    `eager_attention_forward`: soft-capping and all)."""
    out, _ = _eager_call(module, q, k, v, mask, **kwargs)
    return out


def _eager_rows(
    module: Any, rows: torch.Tensor, layer: torch.Tensor, batch: StepBatch, window: int | None, **kwargs: Any
) -> torch.Tensor:
    """Every decode row of the step through the model's own eager attention in one call: each row's
    keys and values gathered from the pool into a batch padded to the longest range, the padding
    masked out (its weights are exactly 0 after the softmax). rows: (1, heads, R, head_dim);
    returns (1, R, heads, head_dim)."""
    ends = batch.row_ends
    starts = [
        max(s, e - window) if window is not None else s for s, e in zip(batch.row_starts, ends, strict=True)
    ]
    longest = max(e - s for s, e in zip(starts, ends, strict=True))
    offsets = torch.arange(longest, device=layer.device)
    first = torch.tensor(starts, device=layer.device).unsqueeze(1)
    last = torch.tensor(ends, device=layer.device).unsqueeze(1) - 1
    at = first + offsets  # (R, longest) pool positions, past a row's end clamped to it
    valid = at <= last
    gathered = layer[:, :, torch.minimum(at, last)]  # (2, kv_heads, R, longest, head_dim)
    keys, values = (
        gathered.permute(0, 2, 1, 3, 4).to(rows.dtype).unbind(0)
    )  # (R, kv_heads, longest, head_dim)
    queries = rows[0].transpose(0, 1).unsqueeze(2)  # (R, heads, 1, head_dim)
    mask = valid.view(len(starts), 1, 1, longest)
    out, _ = _eager_call(module, queries, keys, values, mask, **kwargs)  # (R, 1, heads, head_dim)
    return out.transpose(0, 1)


def _eager_call(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """The module's own `eager_attention_forward` with a bool mask (True: attend) made additive, or,
    for a missing one (SDPA's `is_causal`), the causal mask of the last queries over all the keys."""
    import sys

    eager = sys.modules[type(module).__module__].eager_attention_forward
    queries, keys = q.shape[2], k.shape[2]
    if mask is None and queries > 1:
        rows = torch.arange(queries, device=q.device).unsqueeze(1) + (keys - queries)
        mask = (torch.arange(keys, device=q.device).unsqueeze(0) <= rows).view(1, 1, queries, keys)
    additive = mask
    if mask is not None and mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        additive.masked_fill_(~mask, torch.finfo(q.dtype).min)
    return eager(module, q, k, v, additive, **kwargs)


def attends_in_float32(dtype: torch.dtype, device: torch.device) -> bool:
    """Half-precision attention on a CPU runs in float32 where that is faster: on some CPUs torch's
    SDPA kernel in bfloat16 took 4-9x longer than in float32 for a decode row (one query over 500
    to 2000 keys, SmolLM2's heads, torch 2.13, an AMD EPYC with AVX512-BF16), on others it is 2-3x
    faster (an Intel Xeon with AVX512-BF16), so `cpu.half_attention_is_faster` measures it once.
    The output is cast back to the model's dtype."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and not cpu.half_attention_is_faster(dtype)
    )


def pool_dtype(dtype: torch.dtype, device: torch.device, decode_kernel: bool = False) -> torch.dtype:
    """The dtype of the KV pool for a model computing in `dtype`: the model's where decode rows go
    to the native decode attention's own kernel (`decode_kernel`: it reads half-precision keys and
    values as they are, converting in registers, so the bytes every decode step reads stay half),
    else float32 where attention runs in float32. Keys and values come out of the model in its dtype
    and float32 holds them exactly, so attention reads the same values either way; what a float32
    pool saves SDPA is converting every key and value a request holds at every step, in every layer
    (SmolLM2, a decode row over 200 cached tokens: 60 conversions of 38,000 values a step), at twice
    the pool's memory. Prompt chunks convert their request's keys and values once a chunk. Blocks
    leave the pool in the model's dtype (`kv_pool.blocks_out`), so block hashes and the tiers do not
    change."""
    if decode_kernel and device.type == "cpu":
        return dtype
    return torch.float32 if attends_in_float32(dtype, device) else dtype


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def enable(model: Any) -> str | None:
    """Route `model`'s attention through ours; None when it worked, else why decode cannot be
    batched this way (the caller then decodes one request at a time)."""
    if hf_cache.attention_windows(model) is None:
        return "its cache layers are not all full or sliding-window attention (recurrent or chunked)"
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
def forward_step(
    model: Any,
    token_ids: Sequence[int],
    batch: StepBatch,
    logits_at: Sequence[int],
    pad_to: int | None = None,
) -> torch.Tensor:
    """Run the step's tokens (each segment's, in order) through the model; return the logits at the
    positions `logits_at` of the step, `(len(logits_at), vocab)`. `pad_to` adds dummy tokens up to
    that many (batch-invariant mode: every GEMM then runs at a shape whose kernel gives each row the
    same bits whatever the other rows hold)."""
    ids, pos, keep = step_inputs(token_ids, batch, logits_at, pad_to)
    output = model(
        input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, **{_BATCH_KWARG: batch}
    )
    return output.logits[0, : len(logits_at)]  # (len(logits_at), vocab)


def step_inputs(
    token_ids: Sequence[int], batch: StepBatch, logits_at: Sequence[int], pad_to: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's token ids and positions, `(1, total)` each with `pad_to`'s dummy tokens at the end,
    and the positions whose logits to compute (those asked for, then as many dummies as keep the LM
    head's GEMM at a padded shape)."""
    n = len(token_ids)
    total = max(pad_to or n, n)
    device = batch.pool.device
    positions = [seg.cached + i for seg in batch.segments for i in range(seg.length)]
    ids = torch.tensor([*token_ids, *[0] * (total - n)], dtype=torch.long, device=device).view(1, total)
    pos = torch.tensor([*positions, *[0] * (total - n)], dtype=torch.long, device=device).view(1, total)
    keep = list(logits_at) + list(range(n, total))[: max(0, (pad_to or 0) - len(logits_at))]
    return ids, pos, torch.tensor(keep, dtype=torch.long, device=device)


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

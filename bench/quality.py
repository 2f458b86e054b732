"""`bul bench quality`: what quantized KV blocks do to a real model's output, in decode style.

Two measures, each against the same model with blocks stored as they are (`none`):

  perplexity   of a real English text (below), cut into windows of `--window` tokens. Each window
               is read `--chunk` tokens at a time as a request would (a chunk is a turn): the
               window's earlier blocks come from the prefix cache, stored (quantized, for int8 and
               int4) by the earlier chunks and decoded back; the chunk is computed on top of them
               and its own full blocks stored in turn. Every token after the first chunk is scored,
               and each of them attends to the stored KV of every full block before its chunk.
               With chunk = block size (16, the default) only the tokens of the token's own block
               are exact: the setting closest to llama.cpp's perplexity with a quantized KV cache
               (which quantizes every token's KV), whose 8-bit figure, +0.04 %, is the bar. A
               plain forward over each window (no cache) is measured beside, to show that `none`
               changes nothing.
  agreement    greedy decoding through the engine: a first request stores a passage's blocks, a
               second reuses them (quantized) and generates `--new-tokens` tokens; its tokens are
               compared position by position with those `none` generates, and the tokens before
               the first difference are counted.

The text: four licence texts every Debian system has in /usr/share/common-licenses (`CORPUS`): the
GNU GPL version 3 and version 2, the GNU LGPL version 2.1 and the GNU FDL version 1.3, as they are,
joined by blank lines (22,811 SmolLM2 tokens). Their copyright holder, the Free Software
Foundation, permits verbatim copying of them: "Everyone is permitted to copy and distribute verbatim
copies of this license document, but changing it is not allowed."

    python -m bench.quality [--model smollm2-135m] [--dtype float32] [--window 1024] [--chunk 16]
    python -m bench.quality --quick        # tiny settings on the demo model, for the smoke test
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import format_table, options_from, write_results
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.model_thread import ModelThread
from bulk.models import hf_cache
from bulk.models.loader import LoadedModel, load_model
from bulk.storage.prefix_cache import PrefixCache

log = logging.getLogger("bench.quality")

NAME = "quality"
LICENSES = Path("/usr/share/common-licenses")
CORPUS = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3")
MODES = ("none", "int8", "int4")
LLAMA_CPP_Q8_PCT = 0.04  # llama.cpp's perplexity change with an 8-bit (q8_0) KV cache: 6.2322 -> 6.2344
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "dtype": "float32",
    "window": 1024,
    "chunk": 16,
    "windows": None,  # all of them
    "rows": 8,
    "prompts": 8,
    "prompt_tokens": 256,
    "new_tokens": 128,
}
QUICK: dict[str, Any] = {
    "model": "demo",
    "dtype": "float32",
    "window": 96,
    "chunk": 32,
    "windows": 3,
    "rows": 2,
    "prompts": 2,
    "prompt_tokens": 48,
    "new_tokens": 8,
}


# ---- the text ------------------------------------------------------------------------------------


def load_corpus(directory: Path = LICENSES, names: Sequence[str] = CORPUS) -> str:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise SystemExit(
            f"the text is missing: {', '.join(str(directory / n) for n in missing)} (Debian's base-files)"
        )
    return "\n\n".join((directory / n).read_text(encoding="utf-8") for n in names)


def windows(token_ids: Sequence[int], size: int, limit: int | None = None) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `size` tokens (a shorter tail is dropped)."""
    out = [list(token_ids[i : i + size]) for i in range(0, len(token_ids) - size + 1, size)]
    return out[:limit] if limit is not None else out


# ---- perplexity ----------------------------------------------------------------------------------


def _nll(logits: torch.Tensor, targets: Sequence[int]) -> float:
    """Summed negative log-likelihood of `targets`, one per row of `logits` (computed in float32)."""
    logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long, device=logits.device).unsqueeze(1)
    return float(-logp.gather(1, index).sum())


def perplexity_plain(lm: LoadedModel, wins: Sequence[Sequence[int]], chunk: int) -> dict[str, float]:
    """One forward over each window, no cache: the tokens `perplexity_stored` scores, scored exactly."""
    total, count = 0.0, 0
    for win in wins:
        ids = torch.tensor([list(win)], dtype=torch.long, device=lm.device)
        logits, _ = hf_cache.forward_all(lm.model, ids, None)
        targets = win[chunk + 1 :]
        total += _nll(logits[0, chunk:], targets)
        count += len(targets)
    return _summary(total, count)


def perplexity_stored(
    lm: LoadedModel,
    wins: Sequence[Sequence[int]],
    quantization: str,
    chunk: int,
    block_size: int = 16,
    rows: int = 8,
) -> dict[str, float]:
    """Each window read `chunk` tokens at a time over KV stored in and read back from a prefix cache
    under `quantization`; the tokens after the first chunk scored (see the module's docstring).
    `rows` windows are read side by side, one row each of the same forwards (their chunks line up),
    so that a forward reads the weights once for all of them."""
    if chunk % block_size:
        raise ValueError(f"chunk ({chunk}) must be a multiple of the block size ({block_size})")
    size = len(wins[0])
    if any(len(w) != size for w in wins):
        raise ValueError("every window must hold as many tokens")
    config = KVCacheConfig(
        model=lm.name,
        block_size=block_size,
        quantization=quantization,
        max_tokens=rows * (size + block_size),
        response_cache=False,
    )
    cache = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(block_size))
    total, count = 0.0, 0
    for first in range(0, len(wins), rows):
        group = wins[first : first + rows]
        for start in range(0, size, chunk):
            end = min(start + chunk, size)
            hits = [cache.lookup(win[:end], max_tokens=start) for win in group]
            if any(hit.num_tokens != start for hit in hits):
                raise AssertionError(f"the prefix cache did not return the first {start} tokens")
            kv = hf_cache.cache_from_block_rows(lm.model, [hit.blocks for hit in hits], capacity=size)
            ids = torch.tensor([list(win[start:end]) for win in group], dtype=torch.long, device=lm.device)
            logits, kv = hf_cache.forward_all(lm.model, ids, kv)
            for r, (win, hit) in enumerate(zip(group, hits, strict=True)):
                if start:
                    targets = win[start + 1 : end + 1]
                    total += _nll(logits[r], targets)
                    count += len(targets)
                cache.store_blocks(
                    hit,
                    win[:end],
                    lambda a, b, r=r, kv=kv: hf_cache.blocks_from_cache(kv, a, b, block_size, r),
                )
                cache.release(hit)
        cache.clear()
    return _summary(total, count)


def _summary(total: float, count: int) -> dict[str, float]:
    return {"nll": total, "tokens": count, "perplexity": math.exp(total / count)}


def change_pct(value: float, base: float) -> float:
    return (value / base - 1.0) * 100.0


# ---- greedy agreement ----------------------------------------------------------------------------


class TokenLog:
    """The engine's logits observer: by request id, the greedy token of every step and its margin
    (top logit minus the runner-up: how near a tie the choice was)."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.margins: dict[str, list[float]] = {}

    def __call__(self, seq: Any, logits: torch.Tensor) -> None:
        # argmax, as the engine picks a greedy token: on an exact tie (bfloat16 logits have them)
        # topk may name another of the tied tokens.
        token = int(logits.argmax())
        top = torch.topk(logits.float(), 2).values
        self.tokens.setdefault(seq.request.request_id, []).append(token)
        self.margins.setdefault(seq.request.request_id, []).append(float(top[0] - top[1]))


def greedy_tokens(
    lm: LoadedModel,
    prompts: Sequence[str],
    new_tokens: int,
    quantization: str = "none",
    model_thread: ModelThread | None = None,
    reuse: bool = True,
) -> tuple[list[list[int]], list[list[float]]]:
    """For each prompt (raw text): a first request stores its blocks, a second reuses them and
    decodes `new_tokens` greedy tokens (`reuse=False`: the second request alone, nothing cached);
    returns those tokens (fewer where the model ended) and their margins (see `TokenLog`)."""
    observer = TokenLog()
    config = KVCacheConfig(
        model=lm.name,
        quantization=quantization,
        response_cache=False,
        max_new_tokens_limit=max(new_tokens, 1),
        default_max_new_tokens=max(new_tokens, 1),
    )
    with UltraAdaptiveKVCacheEngine(
        config, model=lm, model_thread=model_thread, logits_observer=observer
    ) as engine:
        for i, prompt in enumerate(prompts):
            if reuse:
                engine.process_request_sync({"query": prompt, "raw": True, "max_new_tokens": 1})
            answer = engine.process_request_sync(
                {"query": prompt, "raw": True, "max_new_tokens": new_tokens, "request_id": f"q{i}"}
            )
            cached = answer["cached_tokens"]
            if (cached < answer["prompt_tokens"] - config.block_size) if reuse else cached:
                raise AssertionError(f"prompt {i} reused {cached} tokens")
            seen = [t for t in observer.tokens[f"q{i}"] if t not in lm.tokenizer.eos_token_ids]
            if lm.tokenizer.decode(seen) != answer["result"]:
                raise AssertionError(f"prompt {i}: the tokens observed are not the answer's")
    ids = [f"q{i}" for i in range(len(prompts))]
    return [observer.tokens[i] for i in ids], [observer.margins[i] for i in ids]


def agreement(
    reference: Sequence[Sequence[int]],
    other: Sequence[Sequence[int]],
    margins: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Position-by-position agreement over the longer of each pair (a missing token disagrees), and
    the tokens before each pair's first difference; with the reference's `margins`, the margin of
    its choice at each first difference (small: a near tie flipped)."""
    same = total = before = 0
    identical = 0
    flipped: list[float] = []
    for n, (a, b) in enumerate(zip(reference, other, strict=True)):
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        before += first
        identical += list(a) == list(b)
        if margins is not None and first < min(len(a), len(b)):
            flipped.append(margins[n][first])
    result = {
        "positions": total,
        "same": same,
        "agreement": same / total if total else 1.0,
        "before_first_difference": before / total if total else 1.0,
        "identical_sequences": identical,
        "sequences": len(reference),
    }
    if margins is not None:
        all_margins = sorted(m for row in margins for m in row)
        result["margins_at_first_difference"] = flipped
        result["median_margin"] = all_margins[len(all_margins) // 2] if all_margins else None
    return result


def passages(lm: LoadedModel, token_ids: Sequence[int], count: int, length: int) -> list[str]:
    """`count` passages of the text, about `length` tokens each, spread over it."""
    step = max(length, (len(token_ids) - length) // max(count, 1))
    return [lm.tokenizer.decode(token_ids[i * step : i * step + length]) for i in range(count)]


# ---- the benchmark -------------------------------------------------------------------------------


def measure(lm: LoadedModel, options: dict[str, Any], modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Perplexity and greedy agreement of `lm` under every quantization in `modes` (`none` first)."""
    text = load_corpus()
    ids = lm.tokenizer.encode(text)
    wins = windows(ids, options["window"], options["windows"])
    chunk = options["chunk"]
    log.info("%s: %d tokens of text, %d windows of %d", lm.name, len(ids), len(wins), options["window"])
    result: dict[str, Any] = {"text_tokens": len(ids), "windows": len(wins)}
    started = time.perf_counter()
    plain = perplexity_plain(lm, wins, chunk)
    log.info("plain forward: perplexity %.4f (%.0f s)", plain["perplexity"], time.perf_counter() - started)
    perplexities = {"plain": plain}
    for mode in modes:
        started = time.perf_counter()
        perplexities[mode] = perplexity_stored(lm, wins, mode, chunk, rows=options["rows"])
        log.info(
            "%s: perplexity %.4f (%.0f s)",
            mode,
            perplexities[mode]["perplexity"],
            time.perf_counter() - started,
        )
    base = perplexities["none"]["perplexity"]
    for figures in perplexities.values():
        figures["change_pct"] = change_pct(figures["perplexity"], base)
    result["perplexity"] = perplexities

    prompts = passages(lm, ids, options["prompts"], options["prompt_tokens"])
    worker = ModelThread(name="bench-quality")
    try:
        generated = {mode: greedy_tokens(lm, prompts, options["new_tokens"], mode, worker) for mode in modes}
    finally:
        worker.shutdown()
    tokens, margins = generated["none"]
    result["agreement"] = {mode: agreement(tokens, generated[mode][0], margins) for mode in modes}
    return result


def render(result: dict[str, Any], settings: dict[str, Any]) -> str:
    ppl = result["perplexity"]
    rows = [
        [
            "plain forward (no cache)" if mode == "plain" else mode,
            f"{figures['perplexity']:.4f}",
            f"{figures['change_pct']:+.3f} %",
            figures["tokens"],
        ]
        for mode, figures in ppl.items()
    ]
    first = format_table(
        ["KV blocks", "perplexity", "vs none", "tokens scored"],
        rows,
        f"Perplexity, {settings['model']} ({settings['dtype']}): {result['text_tokens']} tokens of "
        f"text, {result['windows']} windows of {settings['window']}, read {settings['chunk']} tokens at "
        f"a time over stored blocks (llama.cpp, 8-bit KV: +{LLAMA_CPP_Q8_PCT} %)",
    )
    agree = result["agreement"]
    rows = [
        [
            mode,
            f"{a['agreement'] * 100:.1f} %",
            f"{a['before_first_difference'] * 100:.1f} %",
            f"{a['identical_sequences']}/{a['sequences']}",
            margins_text(a),
        ]
        for mode, a in agree.items()
    ]
    positions = next(iter(agree.values()))["positions"]
    second = format_table(
        ["KV blocks", "same token", "before 1st diff", "identical", "none's margin at 1st diff"],
        rows,
        f"Greedy agreement with none: {settings['prompts']} passages of {settings['prompt_tokens']} tokens, "
        f"their blocks reused, {settings['new_tokens']} new tokens each ({positions} positions)",
    )
    return first + "\n\n" + second


def margins_text(result: dict[str, Any]) -> str:
    """The reference's top-1 minus top-2 logit where each answer first differs, beside its median
    over every step: far below the median means near ties flipped."""
    flipped = result.get("margins_at_first_difference") or []
    if not flipped:
        return "-"
    return f"{', '.join(f'{m:.2f}' for m in sorted(flipped))} (median step {result['median_margin']:.2f})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"default {DEFAULTS['model']}")
    parser.add_argument("--dtype", help=f"default {DEFAULTS['dtype']}")
    parser.add_argument("--window", type=int, help=f"tokens per window (default {DEFAULTS['window']})")
    parser.add_argument("--chunk", type=int, help=f"tokens read at a time (default {DEFAULTS['chunk']})")
    parser.add_argument("--windows", type=int, help="at most this many windows (default: all)")
    parser.add_argument("--rows", type=int, help=f"windows read side by side (default {DEFAULTS['rows']})")
    parser.add_argument("--prompts", type=int, help=f"greedy passages (default {DEFAULTS['prompts']})")
    parser.add_argument(
        "--new-tokens", type=int, help=f"tokens per passage (default {DEFAULTS['new_tokens']})"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny settings on the demo model (smoke test)")
    parser.add_argument("--out", help="results directory (default bench/results)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keys = ("model", "dtype", "window", "chunk", "windows", "rows", "prompts", "new_tokens")
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)
    lm = load_model(KVCacheConfig(model=options["model"], dtype=options["dtype"], device="cpu"))
    settings = {**options, "dtype": lm.dtype_name, "threads": torch.get_num_threads(), "corpus": list(CORPUS)}
    result = measure(lm, options)
    sys.stdout.write(render(result, settings) + "\n")
    path = write_results(NAME, {"settings": settings, **result}, args.out)
    sys.stdout.write(f"\nwritten: {path}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

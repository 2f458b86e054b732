"""`bul bench dtype`: the real model in bfloat16 (weights and KV), and in bfloat16 with int4 weights
(`bulk.models.weight_quant`, what `weight_quantization="auto"` picks for a 4-bit GGUF file), against
float32, side by side.

One process loads the model once per variant and measures them through the engine on one model
thread, interleaved run by run (the order rotating from run to run), so machine noise hits them
alike:

  TTFT            a fresh raw prompt of each `--lengths` (exact token counts), nothing reused
  decode, 1       one request at a time: (completion tokens - 1) / (latency - TTFT)
  decode, N       N requests at once (continuous batching): their completion tokens / wall time
  agreement       greedy tokens of each variant against float32's, position by position, on passages
                  of a real text (the prompt's blocks stored by a first request and reused, as in
                  `bul bench quality`)
  perplexity      of that text, read over stored blocks (`bench.quality.perplexity_stored`), in
                  each variant: its change is that variant's cost in quality

Ratios are variant / float32 (medians of per-run ratios for the timings). Whether this CPU has
bfloat16 instructions (`bulk.models.cpu`) is printed with them: without, bfloat16 is emulated and
slow, and `dtype="auto"` keeps float32.

    python -m bench.dtype [--model smollm2-135m] [--runs 3] [--threads N]
    python -m bench.dtype --quick       # tiny settings on the demo model, for the smoke test
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from bench import quality
from bench.common import format_table, median, options_from, ratio, write_results
from bench.prompts import unique_prompt
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.model_thread import ModelThread
from bulk.models.cpu import has_bf16_instructions
from bulk.models.loader import LoadedModel, load_model

log = logging.getLogger("bench.dtype")

NAME = "dtype"
# Each variant's configuration; the first is the reference the others are compared with.
VARIANTS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32", "weight_quantization": "none"},
    "bfloat16": {"dtype": "bfloat16", "weight_quantization": "none"},
    "bf16+int4": {"dtype": "bfloat16", "weight_quantization": "int4"},
}
BASE = "float32"
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "lengths": [256, 1024],
    "runs": 3,
    "decode_tokens": 128,
    "batch": 16,
    "batch_tokens": 64,
    "prompts": 8,
    "prompt_tokens": 256,
    "new_tokens": 128,
    "window": 1024,
    "chunk": 16,
    "windows": None,
    "rows": 8,
}
QUICK: dict[str, Any] = {
    "model": "demo",
    "lengths": [64],
    "runs": 1,
    "decode_tokens": 8,
    "batch": 3,
    "batch_tokens": 6,
    "prompts": 2,
    "prompt_tokens": 48,
    "new_tokens": 8,
    "window": 96,
    "chunk": 32,
    "windows": 2,
    "rows": 2,
}


def _engine(lm: LoadedModel, worker: ModelThread, options: dict[str, Any]) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(
        model=lm.name,
        dtype=lm.dtype_name,
        weight_quantization=lm.weight_quantization,
        response_cache=False,
        max_batch_size=max(options["batch"], 1),
        default_max_new_tokens=64,
        max_new_tokens_limit=max(options["decode_tokens"], options["batch_tokens"], 64),
    )
    return UltraAdaptiveKVCacheEngine(config, model=lm, model_thread=worker)


def _passage(text_ids: Sequence[int], lm: LoadedModel, index: int, length: int) -> str:
    """A raw passage of the text (its continuation is more text, seldom an end of turn)."""
    start = (index * 997) % max(1, len(text_ids) - length)
    return lm.tokenizer.decode(text_ids[start : start + length])


def measure_speed(models: dict[str, LoadedModel], options: dict[str, Any]) -> dict[str, Any]:
    worker = ModelThread(name="bench-dtype")
    engines = {name: _engine(lm, worker, options) for name, lm in models.items()}
    text = quality.load_corpus()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    try:
        for engine in engines.values():
            engine.warmup_sync()
        for run in range(options["runs"] + 1):  # run 0 warms up and is dropped
            names = list(engines)
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                engine, lm = engines[name], models[name]
                ids = lm.tokenizer.encode(text)
                got: dict[str, float] = {}
                for n in options["lengths"]:
                    answer = engine.process_request_sync(
                        {"query": unique_prompt(lm.tokenizer, n), "raw": True, "max_new_tokens": 1}
                    )
                    if answer["prompt_tokens"] != n or answer["cached_tokens"]:
                        raise AssertionError(
                            f"TTFT prompt: {answer['prompt_tokens']} tokens, not a fresh {n}"
                        )
                    got[f"ttft_{n}"] = answer["ttft_ms"]
                prompt = _passage(ids, lm, 10 + run, options["prompt_tokens"])
                answer = engine.process_request_sync(
                    {"query": prompt, "raw": True, "max_new_tokens": options["decode_tokens"]}
                )
                decoding = (answer["latency"] - answer["ttft_ms"]) / 1000
                got["decode_1"] = (answer["completion_tokens"] - 1) / decoding if decoding > 0 else 0.0
                batch = [
                    _passage(ids, lm, 100 + 17 * run + i, options["prompt_tokens"] // 4)
                    for i in range(options["batch"])
                ]

                def ask(prompt: str, engine: UltraAdaptiveKVCacheEngine = engine) -> dict[str, Any]:
                    request = {"query": prompt, "raw": True, "max_new_tokens": options["batch_tokens"]}
                    return engine.process_request_sync(request)

                started = time.perf_counter()
                with ThreadPoolExecutor(len(batch)) as pool:
                    answers = list(pool.map(ask, batch))
                got[f"decode_{options['batch']}"] = sum(a["completion_tokens"] for a in answers) / (
                    time.perf_counter() - started
                )
                log.info("run %d %s: %s", run, name, {k: round(v, 1) for k, v in got.items()})
                if run:
                    for key, value in got.items():
                        samples[name].setdefault(key, []).append(value)
    finally:
        for engine in engines.values():
            engine.shutdown()
        worker.shutdown()
    keys = list(samples[BASE])
    medians = {name: {k: median(v) for k, v in s.items()} for name, s in samples.items()}
    over_base = {
        name: {
            k: median([ratio(b, a) or 0.0 for a, b in zip(samples[BASE][k], samples[name][k], strict=True)])
            for k in keys
        }
        for name in samples
        if name != BASE
    }
    return {"samples": samples, "medians": medians, "over_float32": over_base}


def measure_quality(models: dict[str, LoadedModel], options: dict[str, Any]) -> dict[str, Any]:
    text = quality.load_corpus()
    out: dict[str, Any] = {"perplexity": {}, "greedy": {}, "margins": {}, "reuse_agreement": {}}
    for name, lm in models.items():
        ids = lm.tokenizer.encode(text)
        wins = quality.windows(ids, options["window"], options["windows"])
        started = time.perf_counter()
        out["perplexity"][name] = quality.perplexity_stored(
            lm, wins, "none", options["chunk"], rows=options["rows"]
        )
        log.info(
            "%s perplexity %.4f (%.0f s)",
            name,
            out["perplexity"][name]["perplexity"],
            time.perf_counter() - started,
        )
        prompts = quality.passages(lm, ids, options["prompts"], options["prompt_tokens"])
        out["greedy"][name], out["margins"][name] = quality.greedy_tokens(lm, prompts, options["new_tokens"])
        # Within one dtype: the same answers with the prompt's blocks reused as without.
        alone, _ = quality.greedy_tokens(lm, prompts, options["new_tokens"], reuse=False)
        out["reuse_agreement"][name] = quality.agreement(alone, out["greedy"][name])
    base = out["perplexity"][BASE]["perplexity"]
    for figures in out["perplexity"].values():
        figures["change_pct"] = quality.change_pct(figures["perplexity"], base)
    out["agreement"] = {
        name: quality.agreement(out["greedy"][BASE], greedy, out["margins"][BASE])
        for name, greedy in out["greedy"].items()
        if name != BASE
    }
    out["text_tokens"] = len(ids)
    out["windows"] = len(wins)
    return out


def render(result: dict[str, Any], settings: dict[str, Any]) -> str:
    speed, medians = result["speed"]["over_float32"], result["speed"]["medians"]
    others = [name for name in VARIANTS if name != BASE]
    labels = {f"ttft_{n}": f"TTFT, {n}-token prompt (ms)" for n in settings["lengths"]}
    labels["decode_1"] = "decode, 1 request (tokens/s)"
    labels[f"decode_{settings['batch']}"] = f"decode, {settings['batch']} at once (tokens/s)"
    rows = [
        [label, *(medians[name][key] for name in VARIANTS), *(f"{speed[name][key]:.2f}x" for name in others)]
        for key, label in labels.items()
    ]
    first = format_table(
        ["", *VARIANTS, *(f"{name} / fp32" for name in others)],
        rows,
        f"{settings['model']}: bfloat16 and int4 weights against float32, median of {settings['runs']} "
        f"runs, {settings['threads']} torch threads; "
        f"CPU bfloat16 instructions: {settings['bf16_instructions']}",
    )
    q = result["quality"]
    ppl, agreement = q["perplexity"], q["agreement"]
    second = format_table(
        ["", *VARIANTS, *(f"{name} change" for name in others)],
        [
            [
                f"perplexity ({q['text_tokens']} tokens, chunks of {settings['chunk']})",
                *(f"{ppl[name]['perplexity']:.4f}" for name in VARIANTS),
                *(f"{ppl[name]['change_pct']:+.3f} %" for name in others),
            ],
            [
                f"greedy tokens as float32's ({agreement[others[0]]['positions']} positions)",
                "",
                *(f"{agreement[name]['agreement'] * 100:.1f} %" for name in others),
                *("" for _ in others),
            ],
            [
                "identical greedy answers",
                "",
                *(
                    f"{agreement[name]['identical_sequences']}/{agreement[name]['sequences']}"
                    for name in others
                ),
                *("" for _ in others),
            ],
            [
                "same greedy tokens with reused blocks as without",
                *(f"{q['reuse_agreement'][name]['agreement'] * 100:.1f} %" for name in VARIANTS),
                *("" for _ in others),
            ],
        ],
    )
    for name in others:
        second += (
            f"\nfloat32's margin (top-1 minus top-2 logit) where {name} first differs: "
            + quality.margins_text(agreement[name])
        )
    return first + "\n\n" + second


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul bench dtype", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"default {DEFAULTS['model']}")
    parser.add_argument("--runs", type=int, help=f"timed runs (default {DEFAULTS['runs']})")
    parser.add_argument("--windows", type=int, help="perplexity windows (default: the whole text)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny settings on the demo model (smoke test)")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from(QUICK if args.quick else DEFAULTS, args, ("model", "runs", "windows"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = {
        name: load_model(KVCacheConfig(model=options["model"], device="cpu", **variant))
        for name, variant in VARIANTS.items()
    }
    settings = {
        **options,
        "threads": torch.get_num_threads(),
        "bf16_instructions": has_bf16_instructions(),
        "corpus": list(quality.CORPUS),
    }
    result = {"speed": measure_speed(models, options), "quality": measure_quality(models, options)}
    sys.stdout.write(render(result, settings) + "\n")
    path = write_results(NAME, {"settings": settings, **result}, args.out)
    sys.stdout.write(f"\nwritten: {path}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())

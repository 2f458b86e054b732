"""`bul bench ttft`: time to first token, ours against Hugging Face, measured side by side.

For each prompt length N, every run times these scenarios, interleaved so that machine noise hits
them alike, comparisons in back-to-back pairs whose order flips every run (see PAIRS); the first run
is a warmup and is dropped:

  cold           our engine, a prompt no engine has seen (nothing reused)
  half_hit       our engine, a fresh prompt whose first N/2 tokens are a prefix cached beforehand
  hf_generate    `generate()` on N tokens, no reuse
  hf_deepcopy    Hugging Face's documented prefix pattern: a cache of the first N/2 tokens computed
                 once, deep-copied per request, then `generate()` on the whole prompt
  hf_forward     one plain forward over N tokens through `hf_cache.forward` (the miss baseline:
                 exactly the model work our cold path does, and nothing else)
  limit_copy     copying the KV bytes a full hit reuses (the concatenation of its blocks)
  limit_forward  one one-token forward on top of a cache that holds N-1 tokens
  question       our engine, what a chat server sees: a prefix of N-Q tokens (a system prompt) cached
                 beforehand, then a new question of Q = 32 tokens, fresh every run; reuses the
                 prefix's full blocks
  limit_question_copy     copying the KV bytes `question` reuses (the concatenation of its blocks)
  limit_question_forward  one forward of the rest (the N - reused tokens after them: the question,
                          plus the prefix's partial last block if any) on top of a cache that holds
                          exactly the reused tokens
  full_hit       our engine, the prompt `cold` timed earlier in this run, so all of its full blocks
                 up to N-1 tokens are cached; timed last so the blocks are not hot in the CPU caches

Ratios of ours to a baseline are medians of per-run ratios (each pair timed back to back), which hold
still on a noisy machine where the ratio of two medians can swing by 10 %. Ratios to a limit divide
medians, the limit being a sum of two medians.

`limit` = median(limit_copy) + median(limit_forward): an estimate of the physical limit of a full hit.
`limit_question` = median(limit_question_copy) + median(limit_question_forward), the same estimate for
a shared prefix: what any engine must do is copy the reused KV and compute the rest, nothing else.
Our scenarios report the engine's own `ttft_ms` (from accepting the request to the first token,
tokenizing and the worker hand-off included); Hugging Face ones the wall time of the call, with the
input tensor built beforehand.

Every scenario runs on one model thread, the engines' shared worker; the Hugging Face ones are
submitted to it and timed inside it, so they pay no hand-off. On CPU the same forward runs at
measurably different speeds on different threads (5-20 % on the 2-core development machine), which
would otherwise bias every comparison one way or the other.

    python -m bench.ttft [--model demo-large] [--lengths 512,1024,2048] [--runs 9] [--threads N]
    python -m bench.ttft --model smollm2-135m     # the real model (prompts of exact token lengths
                                                  # for any tokenizer: bench/prompts.py)
    python -m bench.ttft --quick        # tiny settings, for the smoke test
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.common import median, ratio, time_ms, write_results
from bench.prompts import continuation, unique_prompt
from bench.ttft_report import QUESTION_TOKENS, SCENARIOS, render, target_rows
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.model_thread import ModelThread
from bulk.models import hf_cache
from bulk.models.loader import LoadedModel, load_model

log = logging.getLogger("bench.ttft")

NAME = "ttft"
T = TypeVar("T")

# Timed scenarios, in the order each run performs them. Each comparison is a pair timed back to
# back, and odd runs time the pair in the opposite order (A B, then B A), so drift and order effects
# cancel in the per-run ratios. `question` is timed back to back with both halves of its limit, its
# ratio's denominator. `full_hit` reuses the prompt `cold` stored, so it comes after it.
PAIRS = (
    ("cold", "hf_forward"),
    ("half_hit", "hf_deepcopy"),
    ("hf_generate",),
    ("limit_copy", "limit_forward"),
    ("question", "limit_question_copy", "limit_question_forward"),
    ("full_hit",),
)
RUN_ORDER = tuple(key for pair in PAIRS for key in pair)


def run_order(run: int) -> list[str]:
    return [key for pair in PAIRS for key in (pair if run % 2 == 0 else pair[::-1])]


QUICK = {"model": "demo", "lengths": "64,128", "runs": 2}
DEFAULTS = {"model": "demo-large", "lengths": "512,1024,2048", "runs": 9}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@dataclass
class LengthResult:
    length: int
    runs_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RUN_ORDER})
    cached_tokens: dict[str, int] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        out = {k: median(v) for k, v in self.runs_ms.items()}
        out["limit"] = out["limit_copy"] + out["limit_forward"]
        out["limit_question"] = out["limit_question_copy"] + out["limit_question_forward"]
        return out

    def paired(self, a: str, b: str) -> float | None:
        """Median over runs of a_i / b_i: each pair was timed back to back, so the ratio of the pair is
        far steadier than the ratio of two medians on a noisy machine."""
        per_run = [x / y for x, y in zip(self.runs_ms[a], self.runs_ms[b], strict=True) if y > 0]
        return median(per_run) if per_run else None

    def ratios(self) -> dict[str, float | None]:
        m = self.medians()
        overhead = self.paired("cold", "hf_forward")
        return {
            "cold_over_full_hit": self.paired("cold", "full_hit"),
            "full_hit_over_limit": ratio(m["full_hit"], m["limit"]),
            "miss_overhead_pct": None if overhead is None else (overhead - 1.0) * 100.0,
            "half_hit_over_deepcopy": self.paired("half_hit", "hf_deepcopy"),
            "hf_generate_over_forward": self.paired("hf_generate", "hf_forward"),
            "question_over_limit": ratio(m["question"], m["limit_question"]),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.medians(),
            "runs_ms": self.runs_ms,
            "cached_tokens": self.cached_tokens,
            "ratios": self.ratios(),
        }


def _ids(lm: LoadedModel, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(text)], dtype=torch.long, device=lm.device)


def _request(engine: UltraAdaptiveKVCacheEngine, prompt: str) -> dict[str, Any]:
    # raw: the prompt as it is, never wrapped in a chat template, so it is exactly the tokens timed
    # by the Hugging Face baselines.
    request = {"query": prompt, "raw": True, "max_new_tokens": 1, "response_cache": False}
    return engine.process_request_sync(request)


def measure_length(lm: LoadedModel, n: int, runs: int, max_tokens: int, block_size: int) -> LengthResult:
    """Every scenario for prompts of `n` tokens: one warmup run, then `runs` timed runs."""
    config = KVCacheConfig(
        model=lm.name, max_tokens=max_tokens, block_size=block_size, dtype=lm.dtype_name, response_cache=False
    )
    half = n // 2
    reused_full = min((n // block_size) * block_size, n - 1)  # what a full hit reuses
    reused_half = (half // block_size) * block_size
    system = n - QUESTION_TOKENS  # the question scenario's cached prefix
    reused_question = (system // block_size) * block_size  # its full blocks
    result = LengthResult(n)
    # One engine for cold + full hit (the cold request stores the prompt the full hit then reuses),
    # one for the 50% hit and one for the question, so that no one's stores can evict another's
    # blocks. All engines and every Hugging Face baseline run on one model thread: on CPU the same
    # forward runs at measurably different speeds on different threads, which would bias every
    # comparison.
    model_thread = ModelThread(name="bench-model-thread")
    with (
        UltraAdaptiveKVCacheEngine(config, model=lm, model_thread=model_thread) as ours,
        UltraAdaptiveKVCacheEngine(config, model=lm, model_thread=model_thread) as ours_half,
        UltraAdaptiveKVCacheEngine(config, model=lm, model_thread=model_thread) as ours_question,
    ):
        ours.warmup_sync()
        ours_half.warmup_sync()
        ours_question.warmup_sync()

        # The shared prefix of the 50% scenario, stored once in our engine and computed once for HF.
        shared = unique_prompt(lm.tokenizer, half)
        stored = _request(ours_half, shared)
        _check(stored["cached_tokens"] == 0, f"the shared prefix was already cached: {stored}")
        prefix_ids = _ids(lm, shared)
        _check(prefix_ids.shape[1] == half, "the shared prefix has the wrong length")
        _, hf_prefix_cache = hf_cache.forward(lm.model, prefix_ids, None)

        # The question scenario's prefix (the system prompt), stored once in its own engine.
        system_prompt = unique_prompt(lm.tokenizer, system)
        stored = _request(ours_question, system_prompt)
        _check(stored["cached_tokens"] == 0, f"the question's prefix was already cached: {stored}")
        system_ids = _ids(lm, system_prompt)
        _check(system_ids.shape[1] == system, "the question's prefix has the wrong length")

        # The physical-limit estimate: copying the KV bytes a full hit reuses (its blocks, the last
        # one cut to leave one token to compute), and a forward of one token on N-1 cached tokens.
        limit_ids = _ids(lm, unique_prompt(lm.tokenizer, n))
        _, limit_full = hf_cache.forward(lm.model, limit_ids, None)
        limit_blocks = hf_cache.blocks_from_cache(limit_full, 0, (n // block_size) * block_size, block_size)
        cut = block_size - ((n // block_size) * block_size - reused_full)
        limit_blocks[-1] = limit_blocks[-1][:, :, :, :cut]
        _, limit_base = hf_cache.forward(lm.model, limit_ids[:, : n - 1], None)
        limit_last = limit_ids[:, n - 1 :]

        # The question's limit: copying the blocks it reuses, and a forward of the rest on a cache
        # of exactly those tokens. Any N-token prompt does: the work depends on lengths only.
        question_blocks = hf_cache.blocks_from_cache(limit_full, 0, reused_question, block_size)
        _, question_base = hf_cache.forward(lm.model, limit_ids[:, :reused_question], None)
        question_rest = limit_ids[:, reused_question:]  # (1, n - reused_question)

        for run in range(runs + 1):
            label = "warmup" if run == 0 else f"run {run}/{runs}"
            cold_prompt = unique_prompt(lm.tokenizer, n)
            cold_ids = _ids(lm, cold_prompt)
            half_prompt = shared + continuation(lm.tokenizer, shared, n)
            half_ids = _ids(lm, half_prompt)
            _check(cold_ids.shape[1] == n and half_ids.shape[1] == n, "prompt length mismatch")
            _check(bool(torch.equal(half_ids[:, :half], prefix_ids)), "the 50% prompt lost its prefix")
            # A fresh question every run, so only the prefix is reused.
            question_prompt = system_prompt + continuation(lm.tokenizer, system_prompt, n)
            question_ids = _ids(lm, question_prompt)
            _check(question_ids.shape[1] == n, "question prompt length mismatch")
            _check(bool(torch.equal(question_ids[:, :system], system_ids)), "the question lost its prefix")

            def cold(prompt: str = cold_prompt) -> tuple[float, int]:
                out = _request(ours, prompt)
                _check(out["prompt_tokens"] == n, f"cold: {out['prompt_tokens']} tokens, not {n}")
                _check(out["cached_tokens"] == 0, f"cold prefill reused {out['cached_tokens']} tokens")
                return out["ttft_ms"], out["cached_tokens"]

            def half_hit(prompt: str = half_prompt) -> tuple[float, int]:
                out = _request(ours_half, prompt)
                got = out["cached_tokens"]
                _check(got == reused_half, f"50% hit reused {got} tokens, expected {reused_half}")
                return out["ttft_ms"], got

            def question(prompt: str = question_prompt) -> tuple[float, int]:
                out = _request(ours_question, prompt)
                got = out["cached_tokens"]
                _check(got == reused_question, f"question reused {got} tokens, expected {reused_question}")
                return out["ttft_ms"], got

            def full_hit(prompt: str = cold_prompt) -> tuple[float, int]:
                out = _request(ours, prompt)
                got = out["cached_tokens"]
                _check(got == reused_full, f"full hit reused {got} of {n} tokens, expected {reused_full}")
                return out["ttft_ms"], got

            def on_thread(fn: Callable[[], T]) -> tuple[float, T]:
                return model_thread.submit(lambda: time_ms(fn)).result()

            def timed(fn: Callable[[], Any]) -> tuple[float, None]:
                return on_thread(fn)[0], None

            def hf_deepcopy(ids: torch.Tensor = half_ids) -> tuple[float, None]:
                def call() -> torch.Tensor:
                    copied = hf_cache.copy_cache(hf_prefix_cache)
                    return hf_cache.hf_generate(lm.model, ids, 1, cache=copied)

                ms, out = on_thread(call)
                _check(out.shape[1] == n + 1, "HF deep-copy pattern did not generate one token")
                return ms, None

            def limit_forward() -> tuple[float, None]:
                # Deep-copied untimed, so the timed forward never grows the shared base cache.
                copied = model_thread.submit(lambda: hf_cache.copy_cache(limit_base)).result()
                return timed(lambda: hf_cache.forward(lm.model, limit_last, copied))

            def limit_question_forward() -> tuple[float, None]:
                # Deep-copied untimed, as for limit_forward.
                copied = model_thread.submit(lambda: hf_cache.copy_cache(question_base)).result()
                return timed(lambda: hf_cache.forward(lm.model, question_rest, copied))

            scenarios: dict[str, Callable[[], tuple[float, int | None]]] = {
                "cold": cold,
                "half_hit": half_hit,
                "hf_generate": lambda ids=cold_ids: timed(lambda: hf_cache.hf_generate(lm.model, ids, 1)),
                "hf_deepcopy": hf_deepcopy,
                "hf_forward": lambda ids=cold_ids: timed(lambda: hf_cache.forward(lm.model, ids, None)),
                "limit_copy": lambda: timed(lambda: torch.cat(limit_blocks, dim=3)),
                "limit_forward": limit_forward,
                "question": question,
                "limit_question_copy": lambda: timed(lambda: torch.cat(question_blocks, dim=3)),
                "limit_question_forward": limit_question_forward,
                "full_hit": full_hit,
            }
            for key in run_order(run):
                ms, cached = scenarios[key]()
                _check(ms > 0, f"{key}: non-positive time {ms}")
                if cached is not None:
                    result.cached_tokens[key] = cached
                if run > 0:
                    result.runs_ms[key].append(ms)
                log.info(
                    "N=%d %-11s %-22s %9.1f ms%s",
                    n,
                    label,
                    key,
                    ms,
                    "" if cached is None else f"  (reused {cached} tokens)",
                )
    model_thread.shutdown()
    result.cached_tokens["limit_copy"] = reused_full
    result.cached_tokens["limit_question_copy"] = reused_question
    return result


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--lengths must be integers separated by commas, got {text!r}") from None
    if not lengths:
        raise SystemExit("--lengths is empty")
    return lengths


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bul bench ttft",
        description="Time to first token: cold prefill, full and 50%% prefix hits, a cached prefix plus a "
        "new question, Hugging Face generate() and its deep-copy prefix pattern, and the physical limits, "
        "side by side.",
    )
    parser.add_argument(
        "--model", help=f"model to load (default {DEFAULTS['model']}; smollm2-135m: the real model)"
    )
    parser.add_argument("--dtype", default="auto", help="auto (the default), float32, bfloat16")
    parser.add_argument("--lengths", help=f"prompt lengths in tokens (default {DEFAULTS['lengths']})")
    parser.add_argument("--runs", type=int, help=f"timed runs per scenario (default {DEFAULTS['runs']})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: model demo, 64,128, 2 runs")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    model_name = args.model or base["model"]
    lengths = _parse_lengths(args.lengths or base["lengths"])
    runs = args.runs if args.runs is not None else base["runs"]
    if runs < 1:
        raise SystemExit("--runs must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    block_size = args.block_size
    # Two blocks, and a question prefix of at least one full block (something for it to reuse).
    shortest = max(2 * block_size, QUESTION_TOKENS + block_size)
    if lengths[0] < shortest:
        raise SystemExit(
            f"every length must be at least {shortest} tokens (two blocks, and one block before "
            f"the {QUESTION_TOKENS}-token question)"
        )

    lm = load_model(KVCacheConfig(model=model_name, block_size=block_size, dtype=args.dtype))
    if lengths[-1] >= lm.context_length:
        raise SystemExit(f"{lengths[-1]} tokens does not fit the context of {lm.context_length}")
    if not hf_cache.plain_attention(lm.model):
        # Its baselines rebuild transformers' own cache from blocks: plain attention only.
        raise SystemExit(f"model {model_name} has layers other than full attention: nothing to measure here")
    # Enough for the largest prompt twice over (the cold prompt of the last run and of this one).
    max_tokens = 2 * lengths[-1] + 8 * block_size
    settings = {
        "model": model_name,
        "lengths": lengths,
        "runs": runs,
        "warmup_runs": 1,
        "threads": torch.get_num_threads(),
        "threads_requested": args.threads,
        "block_size": block_size,
        "question_tokens": QUESTION_TOKENS,
        "max_tokens": max_tokens,
        "device": str(lm.device),
        "dtype": lm.dtype_name,
        "kv_bytes_per_token": lm.kv_bytes_per_token,
        "quick": args.quick,
    }
    log.info("ttft: %s", settings)

    results = [measure_length(lm, n, runs, max_tokens, block_size) for n in lengths]
    targets = target_rows(results)
    payload = {
        "settings": settings,
        "scenarios": SCENARIOS,
        "results": {str(r.length): r.to_json() for r in results},
        "targets": targets,
    }
    path = write_results(NAME, payload, args.out)
    print(render(results, targets, settings))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())

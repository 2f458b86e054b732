"""The offline baseline of `bul bench serve`: transformers' own continuous batching (`generate_batch`)
on the same prompts, in a process of its own (it changes the model it runs on).

    python -m bench.serve_hf PROMPTS.json --model demo-large --max-new-tokens 64

reads a JSON list of prompts, answers them all greedily in one `generate_batch` call (after an
untimed warmup call), and prints one JSON object: tokens, seconds, tokens/s, peak RSS."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from bulk.config import KVCacheConfig
from bulk.models import hf_cache
from bulk.models.loader import load_model

PAGE = 256  # tokens per page of its KV pool (its default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_hf")
    parser.add_argument("prompts", help="a JSON file holding a list of prompts")
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=16, help="requests decoded at once")
    args = parser.parse_args(argv)
    prompts = json.loads(Path(args.prompts).read_text())
    lm = load_model(KVCacheConfig(model=args.model, device="cpu", dtype=args.dtype))
    inputs = [lm.tokenizer.encode(p) for p in prompts]
    eos = min(lm.tokenizer.eos_token_ids)
    pad = lm.model.config.pad_token_id if lm.model.config.pad_token_id is not None else eos
    # Room for every request at once, as our server's max_batch_tokens gives ours.
    longest = max(len(i) for i in inputs) + args.max_new_tokens
    num_blocks = len(inputs) * (-(-longest // PAGE)) + 4

    def run(batch: list[list[int]]) -> list[list[int]]:
        return hf_cache.hf_generate_batch(
            lm.model,
            batch,
            args.max_new_tokens,
            eos,
            pad,
            num_blocks=num_blocks,
            max_batch_tokens=2048,
            max_requests=args.max_requests,
        )

    run(inputs[:2])  # warmup
    started = time.perf_counter()
    answers = run(inputs)
    seconds = time.perf_counter() - started
    tokens = sum(len(a) for a in answers)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(
        {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak_kib / 1024,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bul bench decode`: what one decode step costs against its rows and their context.

A decode step reads every weight once, however many rows it serves, and every row's keys and
values once; so its cost should grow slowly with rows and context. This prints the step's
milliseconds, per step and per row, at 1 to 32 rows over 256 to 1,024 cached tokens each, on the
engine's own model runner (the pool, the step's forward, the native code as `bul serve` runs it),
beside the same steps with the `native_decode` setting off (the Python loop, one SDPA call per
decode row: what the engine does without a C++ compiler).

Each configuration runs in a process of its own with the threads a server gets (`child_env`: the
caller's OpenMP wait policy, not the benchmark's passive one). A step is timed over the same
context again and again (the rows' KV is rewritten at the same positions), median of 12.

    python -m bench.decode [--model smollm2-135m] [--rows 1,4,8,16,32] [--context 256,1024]
    python -m bench.decode --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from typing import Any

from bench import child_env
from bench.common import format_table, options_from, ratio, write_results

log = logging.getLogger("bench.decode")

NAME = "decode"
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "dtype": "auto",
    "rows": [1, 4, 8, 16, 32],
    "context": [256, 1024],
    "threads": 2,
    "steps": 12,
}
QUICK: dict[str, Any] = {**DEFAULTS, "model": "demo", "rows": [1, 4], "context": [64], "steps": 3}


def measure(options: dict[str, Any], native_decode: bool) -> dict[str, Any]:
    """Step milliseconds (median) at every (rows, context), in this process."""
    import torch

    from bulk.config import KVCacheConfig
    from bulk.engine.model_runner import ModelRunner
    from bulk.engine.request import parse_request
    from bulk.engine.sequence import Sequence, Status
    from bulk.models.loader import load_model
    from bulk.storage.prefix_cache import PrefixCache

    torch.set_num_threads(options["threads"])
    longest = max(options["rows"]) * (max(options["context"]) + 8)
    config = KVCacheConfig(
        model=options["model"],
        dtype=options["dtype"],
        response_cache=False,
        native_decode=native_decode,
        max_batch_tokens=longest,
        max_batch_size=max(options["rows"]),
    )
    lm = load_model(config)
    prefix = PrefixCache(config, lm.fingerprint, lm.dtype, lm.block_shape(config.block_size))
    runner = ModelRunner(lm, prefix, config)
    rng = random.Random(0)
    vocab = int(lm.model.config.vocab_size)
    out: dict[str, Any] = {
        "dtype": lm.dtype_name,
        "weights": lm.weight_quantization,
        "pool_dtype": str(runner.pool.dtype).removeprefix("torch."),
        "native_layers": runner.plain_step is not None and runner.plain_step.native is not None,
        "native_attention": runner.decode_attention is not None,
        "steps_ms": {},
    }
    for context in options["context"]:
        for rows in options["rows"]:
            seqs = []
            for i in range(rows):
                seq = Sequence(parse_request({"query": "x"}, config), 0.0)
                seq.start([rng.randrange(10, vocab) for _ in range(context)], 8, lm.tokenizer)
                seq.slot, seq.status = i * (context + 8), Status.PREFILL
                seqs.append(seq)
            runner.forward([(s, context) for s in seqs], [])  # their prompts, in one forward
            for seq in seqs:
                seq.next_token, seq.status = 5, Status.DECODE
            times = []
            for _ in range(options["steps"]):
                started = time.perf_counter()
                runner.forward([], seqs)
                times.append(time.perf_counter() - started)
                for seq in seqs:
                    seq.num_computed -= 1  # the same context again
            times.sort()
            out["steps_ms"][f"{rows}x{context}"] = times[len(times) // 2] * 1000
    return out


def measure_in_child(options: dict[str, Any], native_decode: bool) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.decode",
        "--child",
        json.dumps({**options, "native": native_decode}),
    ]
    answer = subprocess.run(
        command,
        env=child_env({"OMP_NUM_THREADS": str(options["threads"])}),
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(answer.stdout.strip().splitlines()[-1])


def run(options: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"options": options, "runs": {}}
    for native_decode in (True, False):
        name = "native" if native_decode else "python"
        log.info("decode steps, native_decode=%s", native_decode)
        result["runs"][name] = measure_in_child(options, native_decode)
    return result


def render(result: dict[str, Any]) -> str:
    options, runs = result["options"], result["runs"]
    native, python = runs["native"], runs["python"]
    rows = []
    for context in options["context"]:
        for n in options["rows"]:
            key = f"{n}x{context}"
            ours, theirs = native["steps_ms"][key], python["steps_ms"][key]
            rows.append([n, context, f"{ours:.1f}", f"{ours / n:.2f}", f"{theirs:.1f}", f"{theirs / n:.2f}",
                         f"{ratio(theirs, ours):.2f}"])  # fmt: skip
    head = (
        f"decode step, {options['model']} ({native['dtype']}, weights {native['weights']}, pool "
        f"{native['pool_dtype']}), {options['threads']} threads, median of {options['steps']} steps\n"
        f"native: layers {native['native_layers']}, attention {native['native_attention']}; "
        f"python: the Python loop, SDPA per decode row (pool {python['pool_dtype']})\n"
    )
    table = format_table(
        ["rows", "context", "native ms", "ms/row", "python ms", "ms/row", "python/native"], rows
    )
    return head + table


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--dtype")
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--context", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="results folder (default bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        options = json.loads(args.child)
        print(json.dumps(measure(options, options.pop("native"))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from(
        QUICK if args.quick else DEFAULTS, args, ("model", "dtype", "rows", "context", "threads", "steps")
    )
    result = run(options)
    print(render(result))
    write_results(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

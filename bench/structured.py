"""`bul bench structured`: what a JSON-schema constraint costs a decode row, and how fast grammars compile.

On the engine as `bul serve` runs it (the default real model, its dtype and native decode), the same
chat prompts are answered with and without a JSON schema (`structured_outputs`), by 1 and by 16
clients at once. The unconstrained answers are held to the constrained ones' length (`ignore_eos`,
`max_new_tokens` = their median), so both sides decode the same number of tokens. A row's per-token
cost is its answer's time after the first token over its tokens after the first; the figure is the
median over requests (16 at least at each level), constrained / unconstrained, measured in
alternating rounds in one process.
Also: the share of constrained answers that finished and validate (`jsonschema`), the grammar
engine's vocabulary build (once per tokenizer), and a schema's compile time cold and from the cache.

    python -m bench.structured [--model smollm2-135m] [--clients 1,16] [--rounds 3]
    python -m bench.structured --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

import jsonschema

from bench.common import format_table, options_from, ratio, write_results

log = logging.getLogger("bench.structured")

NAME = "structured"
DEFAULTS: dict[str, Any] = {"model": "smollm2-135m", "clients": [1, 16], "rounds": 3, "threads": 2}
QUICK: dict[str, Any] = {**DEFAULTS, "clients": [1, 4], "rounds": 1}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = ["a chef", "a pilot", "a painter", "a nurse", "a farmer", "a teacher", "a sailor", "a poet"]


def prompts(n: int, round_: int) -> list[list[dict[str, str]]]:
    # Distinct per client and round: no answer is the response cache's, no prompt fully cached.
    return [
        [
            {
                "role": "user",
                "content": f"Describe {PEOPLE[i % len(PEOPLE)]} number {round_ * 100 + i} as JSON.",
            }
        ]
        for i in range(n)
    ]


async def _batch(engine: Any, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(engine.process_request(body) for body in bodies)))


def per_token_ms(result: dict[str, Any]) -> float | None:
    tokens = result["completion_tokens"]
    return (result["latency"] - result["ttft_ms"]) / (tokens - 1) if tokens > 1 else None


def run(options: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bulk.config import KVCacheConfig
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine
    from bulk.generation.structured import GRAMMARS, Constraint
    from bulk.models.tokenizer import grammar_vocabulary

    torch.set_num_threads(options["threads"])
    config = KVCacheConfig(model=options["model"], response_cache=False, max_batch_size=32)
    rows: list[dict[str, Any]] = []
    with UltraAdaptiveKVCacheEngine(config) as engine:
        engine.warmup_sync()
        tokenizer = engine.model.tokenizer
        started = time.perf_counter()
        vocabulary = grammar_vocabulary(tokenizer)
        vocabulary_ms = (time.perf_counter() - started) * 1000
        compile_cold, compile_cached = [], []
        for i in range(5):
            schema = {**SCHEMA, "title": f"fresh {i} {time.time_ns()}"}  # a schema the cache has not seen
            constraint = Constraint("json", json.dumps(schema))
            for times in (compile_cold, compile_cached):
                started = time.perf_counter()
                GRAMMARS.row_grammar(constraint, vocabulary)
                times.append((time.perf_counter() - started) * 1000)
        constrained = {"structured_outputs": {"json": SCHEMA}, "max_new_tokens": 96, "temperature": 0}
        for clients in options["clients"]:
            on, off, finished, valid = [], [], 0, 0
            # At least 16 requests a level: one client's 3 rounds are 3 numbers, too few on a noisy machine.
            rounds = max(options["rounds"], -(-16 // clients))
            for round_ in range(rounds):
                asks = prompts(clients, round_)
                answers = asyncio.run(_batch(engine, [{"messages": m, **constrained} for m in asks]))
                for answer in answers:
                    if answer["finish_reason"] == "stop":
                        finished += 1
                        try:
                            jsonschema.validate(json.loads(answer["result"]), SCHEMA)
                            valid += 1
                        except (ValueError, jsonschema.ValidationError):
                            log.warning("an invalid answer: %r", answer["result"])
                length = int(statistics.median(a["completion_tokens"] for a in answers))
                free = {"max_new_tokens": max(length, 2), "ignore_eos": True, "temperature": 0}
                plain = asyncio.run(
                    _batch(engine, [{"messages": m, **free} for m in prompts(clients, round_ + 50)])
                )
                on += [v for a in answers if (v := per_token_ms(a)) is not None]
                off += [v for a in plain if (v := per_token_ms(a)) is not None]
            total = clients * rounds
            rows.append(
                {
                    "clients": clients,
                    "constrained_ms_per_token": statistics.median(on),
                    "unconstrained_ms_per_token": statistics.median(off),
                    "ratio": ratio(statistics.median(on), statistics.median(off)),
                    "finished": finished,
                    "valid": valid,
                    "requests": total,
                }
            )
    return {
        "options": options,
        "rows": rows,
        "vocabulary_ms": vocabulary_ms,
        "compile_cold_ms": statistics.median(compile_cold),
        "compile_cached_ms": statistics.median(compile_cached),
    }


def render(result: dict[str, Any]) -> str:
    table = format_table(
        [
            "clients",
            "constrained ms/token",
            "unconstrained ms/token",
            "ratio (target <= 1.1)",
            "valid / finished / sent",
        ],
        [
            [
                r["clients"],
                r["constrained_ms_per_token"],
                r["unconstrained_ms_per_token"],
                f"{r['ratio']:.3f}x" if r["ratio"] is not None else None,
                f"{r['valid']} / {r['finished']} / {r['requests']}",
            ]
            for r in result["rows"]
        ],
        title="JSON-schema constraint on {model}, {threads} threads".format(**result["options"]),
    )
    return (
        f"{table}\n"
        f"grammar vocabulary built once per tokenizer: {result['vocabulary_ms']:.0f} ms; "
        f"schema compile, median of 5: cold {result['compile_cold_ms']:.2f} ms, "
        f"cached {result['compile_cached_ms']:.3f} ms"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bul bench structured", description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from(QUICK if args.quick else DEFAULTS, args, ("model", "clients", "rounds", "threads"))
    result = run(options)
    print(render(result))
    write_results(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bul bench structured`: what a JSON-schema constraint costs a decode row, and how fast grammars compile.

On the engine as `bul serve` runs it (the default real model, its dtype and native decode), the same
chat prompts are answered with and without a JSON schema (`structured_outputs`), by 1 and by 16
clients at once. The unconstrained answers are held to the constrained ones' length (`ignore_eos`,
`max_new_tokens` = their median), so both sides decode the same number of tokens. A row's per-token
cost is its answer's time after the first token over its tokens after the first; the figure is the
median over requests (16 at least at each level), constrained / unconstrained, measured in
alternating rounds in one process. The constrained side runs without jump-forward (an engine on the
same model with `jump_forward` off): that ratio is what the grammar's masks cost a row. The same
constrained requests with jump-forward (the default) beside it: its ms per answer token, and the gain
(without / with).
Also: the share of constrained answers that finished and validate (`jsonschema`), the grammar
engine's vocabulary build (once per tokenizer), and a schema's compile time cold and from the cache.

The `peers` part (skipped with `--no-peers`): our server and vLLM's CPU engine, started as
`bul bench peers` starts them (`bench.peers`: vLLM installed on first use under `build/peers/`),
both on `--threads` threads, are sent the same structured-output requests: each schema of
`bench.structured_schemas` (~40, as applications send them) with its chat prompt, as
`/v1/chat/completions` with `response_format: {"type": "json_schema", "json_schema": {"name",
"schema", "strict": true}}`, greedy, `max_tokens` 256, not streamed, one request at a time, ours then
vLLM for each schema (each once both servers are idle). Per server: schemas answered (HTTP 200),
refused (4xx, with the message), 5xx (the target: none), finished (`finish_reason` "stop"), valid
among the finished (the target: all of them), and completion tokens/s (completion tokens / wall time,
over the answered requests). Validity is `jsonschema`'s Draft 2020-12 with the format checker off:
`format` (date, email, uri) is an annotation there, and vLLM's engines do not enforce it either.

    python -m bench.structured [--model smollm2-135m] [--clients 1,16] [--rounds 3] [--no-peers]
    python -m bench.structured --quick
    python -m bench.structured --peers-only     # only the comparison with vLLM
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jsonschema

from bench.common import format_table, options_from, ratio, write_results
from bench.structured_schemas import SCHEMAS

log = logging.getLogger("bench.structured")

NAME = "structured"
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "clients": [1, 16],
    "rounds": 3,
    "threads": 2,
    "peers": True,  # the comparison with vLLM's CPU engine
    "engine": True,  # the in-process part
    "max_tokens": 256,  # each structured answer's bound in the peers part
}
QUICK: dict[str, Any] = {**DEFAULTS, "clients": [1, 4], "rounds": 1}
# One request's limit in the peers part: 256 tokens at a few tokens/s on a busy 2-core machine.
REQUEST_TIMEOUT_S = 600.0
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
        # The same model without jump-forward: what the grammar's masks alone cost a row.
        masked_only = UltraAdaptiveKVCacheEngine(
            dataclasses.replace(config, jump_forward=False), model=engine.model
        )
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
            on, off, jumped, finished, valid = [], [], [], 0, 0
            # At least 16 requests a level: one client's 3 rounds are 3 numbers, too few on a noisy machine.
            rounds = max(options["rounds"], -(-16 // clients))
            # One unmeasured round on each engine first: each scheduler sizes its prompt chunks
            # from the step costs it has measured, which a fresh engine has not yet.
            for warm in (masked_only, engine):
                asyncio.run(_batch(warm, [{"messages": m, **constrained} for m in prompts(clients, 90)]))
            for round_ in range(rounds):
                asks = prompts(clients, round_)
                answers = asyncio.run(_batch(masked_only, [{"messages": m, **constrained} for m in asks]))
                with_jumps = asyncio.run(_batch(engine, [{"messages": m, **constrained} for m in asks]))
                for answer in answers + with_jumps:
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
                jumped += [v for a in with_jumps if (v := per_token_ms(a)) is not None]
                off += [v for a in plain if (v := per_token_ms(a)) is not None]
            total = 2 * clients * rounds
            rows.append(
                {
                    "clients": clients,
                    "constrained_ms_per_token": statistics.median(on),
                    "unconstrained_ms_per_token": statistics.median(off),
                    "ratio": ratio(statistics.median(on), statistics.median(off)),
                    "jump_forward_ms_per_token": statistics.median(jumped),
                    "jump_forward_gain": ratio(statistics.median(on), statistics.median(jumped)),
                    "finished": finished,
                    "valid": valid,
                    "requests": total,
                }
            )
        masked_only.shutdown()
    return {
        "options": options,
        "rows": rows,
        "vocabulary_ms": vocabulary_ms,
        "compile_cold_ms": statistics.median(compile_cold),
        "compile_cached_ms": statistics.median(compile_cached),
    }


# ---- the peers part: ours and vLLM on the same schemas ------------------------------------------


def chat_body(entry: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    """The request of one schema: its prompt, its schema as OpenAI's `json_schema` response format."""
    from bench.serve_load import MODEL

    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": entry["prompt"]}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": entry["name"], "schema": entry["schema"], "strict": True},
        },
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": False,
    }


def post_chat(
    url: str, body: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S
) -> tuple[int, Any, float]:
    """POST `body` to `url`'s `/v1/chat/completions`: (HTTP status, the answer's JSON or its text,
    seconds). Status 0: no HTTP answer (refused connection, timeout); the text says why."""
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, TimeoutError) as exc:
        return 0, f"no answer: {type(exc).__name__}: {exc}", time.perf_counter() - started
    seconds = time.perf_counter() - started
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text), seconds
    except ValueError:
        return status, text, seconds


def error_message(payload: Any) -> str:
    """The message of an error answer, whichever shape it has: OpenAI's (and ours) `{"error":
    {"message"}}`, vLLM's older `{"message"}`, FastAPI's `{"detail"}`, or plain text."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if payload.get("message"):
            return str(payload["message"])
        if payload.get("detail"):
            detail = payload["detail"]
            return detail if isinstance(detail, str) else json.dumps(detail)
        return ""
    return str(payload or "")


def check(schema: Mapping[str, Any], content: str | None) -> str | None:
    """Why `content` is not a valid instance of `schema` (None: it is). Draft 2020-12, the format
    checker off: `format` is an annotation, which vLLM's engines do not enforce either."""
    if content is None:
        return "no content"
    try:
        instance = json.loads(content)
    except ValueError as exc:
        return f"not JSON: {exc}"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where or '(root)'}: {error.message}"


def record(entry: Mapping[str, Any], status: int, payload: Any, seconds: float) -> dict[str, Any]:
    """One request's outcome: status, seconds, and for an answer its finish reason, completion
    tokens, content and (when it finished) whether it validates; for an error its message."""
    out: dict[str, Any] = {"schema": entry["name"], "status": status, "seconds": seconds}
    if status != 200 or not isinstance(payload, dict):
        out["message"] = error_message(payload)
        return out
    try:
        choice = payload["choices"][0]
        content = choice["message"].get("content")
        out.update(
            {
                "finish_reason": choice.get("finish_reason"),
                "completion_tokens": int((payload.get("usage") or {}).get("completion_tokens") or 0),
                "content": content,
            }
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        out.update({"finish_reason": None, "completion_tokens": 0, "content": None})
        out["message"] = f"malformed answer: {exc!r}"
        return out
    if out["finish_reason"] == "stop":
        why = check(entry["schema"], content)
        out["valid"] = why is None
        if why is not None:
            out["invalid"] = why
    return out


def tally(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One server's counts over its records: sent, answered (200), refused (4xx), server errors (5xx),
    no answer (no HTTP status), finished (`stop`), valid (among finished), and completion tokens /
    wall time over the answered requests."""
    records = list(records)
    answered = [r for r in records if r["status"] == 200]
    tokens = sum(r.get("completion_tokens", 0) for r in answered)
    seconds = sum(r["seconds"] for r in answered)
    finished = [r for r in answered if r.get("finish_reason") == "stop"]
    return {
        "sent": len(records),
        "answered": len(answered),
        "refused": sum(1 for r in records if 400 <= r["status"] < 500),
        "server_errors": sum(1 for r in records if r["status"] >= 500),
        "no_answer": sum(1 for r in records if r["status"] == 0),
        "finished": len(finished),
        "length": sum(1 for r in answered if r.get("finish_reason") == "length"),
        "valid": sum(1 for r in finished if r.get("valid")),
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
    }


def both_answered_rate(
    mine: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]]
) -> float | None:
    """ours / theirs completion tokens/s over only the schemas both servers answered."""
    pairs = [(a, b) for a, b in zip(mine, theirs, strict=True) if a["status"] == 200 and b["status"] == 200]
    ours, other = tally(a for a, _ in pairs), tally(b for _, b in pairs)
    return ratio(ours["tokens_per_s"], other["tokens_per_s"])


def peer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`bul bench peers`' settings for the two servers, on this benchmark's threads."""
    from bench import peers

    return {**peers.DEFAULTS, "threads_ours": options["threads"], "threads_theirs": options["threads"]}


def run_peers(options: Mapping[str, Any], schemas: list[dict[str, Any]] = SCHEMAS) -> dict[str, Any]:
    """Both servers up, warmed, then every schema to ours and then vLLM, each once both are idle."""
    from contextlib import ExitStack

    from bench import peers
    from bench.common import named_model_folder
    from bench.peers_build import VLLM, default_build, ensure_built
    from bench.quality import load_corpus

    build = default_build(peer=VLLM)
    try:
        build_record = ensure_built(build)
    except (subprocess.CalledProcessError, OSError) as exc:
        log.error("vLLM could not be installed; the peers part is skipped: %s", exc)
        return {"skipped": f"vLLM install failed: {exc}"}
    settings = peer_options(options)
    sides = ("ours", VLLM)
    records: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with ExitStack() as stack:
        servers, described = {}, {}
        servers["ours"], described["ours"] = stack.enter_context(
            peers.ours_server(settings, options["model"])
        )
        folder = named_model_folder(options["model"])
        servers[VLLM], described[VLLM] = stack.enter_context(peers.vllm_server(build, folder, settings))
        text = load_corpus()
        warm_body = chat_body({"name": "warm", "prompt": "Describe a chef as JSON.", "schema": SCHEMA}, 32)
        for side, server in servers.items():
            peers.warm(server.url, text)  # first-call costs, unmeasured
            status, payload, _ = post_chat(server.url, warm_body)  # and the first grammar's
            log.info("%s: warm structured request: %d", side, status)
        pids = [server.pid for server in servers.values()]
        for i, entry in enumerate(schemas):
            body = chat_body(entry, options["max_tokens"])
            for side in sides:
                for pid in pids:
                    peers.wait_idle(pid)
                status, payload, seconds = post_chat(servers[side].url, body)
                done = record(entry, status, payload, seconds)
                records[side].append(done)
                log.info(
                    "%d/%d %s %s: %d %s %s tokens in %.1f s%s",
                    i + 1,
                    len(schemas),
                    entry["name"],
                    side,
                    status,
                    done.get("finish_reason"),
                    done.get("completion_tokens"),
                    seconds,
                    f" ({done['message'][:80]})" if done.get("message") else "",
                )
    tallies = {side: tally(records[side]) for side in sides}
    return {
        "schemas": [{"name": e["name"], "keywords": e["keywords"]} for e in schemas],
        "max_tokens": options["max_tokens"],
        "validation": "jsonschema Draft 2020-12, format checker off",
        "vllm_build": build_record,
        "servers": {
            side: {**described[side], "records": records[side], "tally": tallies[side]} for side in sides
        },
        "tokens_per_s_ratio": ratio(tallies["ours"]["tokens_per_s"], tallies[VLLM]["tokens_per_s"]),
        "tokens_per_s_ratio_both_answered": both_answered_rate(records["ours"], records[VLLM]),
    }


def _cell(r: Mapping[str, Any]) -> str:
    """One request in the per-schema table: the status, or the finish reason and validity."""
    if r["status"] != 200:
        return str(r["status"] or "no answer")
    if r.get("finish_reason") != "stop":
        return f"{r.get('finish_reason')} {r.get('completion_tokens')}t"
    return f"{'valid' if r.get('valid') else 'INVALID'} {r.get('completion_tokens')}t"


def render_peers(result: Mapping[str, Any]) -> str:
    from bench.peers_build import VLLM

    if "skipped" in result:
        return f"peers: not run ({result['skipped']})"
    servers = result["servers"]
    labels = {"ours": "ours", VLLM: "vLLM CPU"}
    rows = []
    for side, server in servers.items():
        t = server["tally"]
        rows.append(
            [
                labels[side],
                t["sent"],
                t["answered"],
                t["refused"],
                t["server_errors"],
                t["no_answer"],
                t["finished"],
                t["length"],
                f"{t['valid']} / {t['finished']}"
                + (f" ({t['valid'] / t['finished'] * 100:.0f} %)" if t["finished"] else ""),
                t["completion_tokens"],
                t["seconds"],
                "-" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:.2f}",
            ]
        )
    build = result.get("vllm_build") or {}
    table = format_table(
        [
            "server",
            "sent",
            "answered (200)",
            "refused (4xx)",
            "5xx",
            "no answer",
            "finished (stop)",
            "length",
            "valid / finished",
            "tokens",
            "wall s",
            "tokens/s",
        ],
        rows,
        f"Structured outputs, {len(result['schemas'])} schemas, max_tokens {result['max_tokens']}, greedy, "
        f"one request at a time: ours against vLLM CPU {build.get('version', '?')} (targets: 5xx 0, "
        "valid / finished 100 %)",
    )

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = [
        table,
        f"ours / vLLM completion tokens/s: {x(result['tokens_per_s_ratio'])} over each one's answered "
        f"requests, {x(result['tokens_per_s_ratio_both_answered'])} over the schemas both answered",
        f"validity: {result['validation']} (vLLM does not enforce `format` either)",
    ]
    for side, server in servers.items():
        refused = [r for r in server["records"] if r["status"] != 200]
        lines.append(f"{labels[side]} refused or failed ({len(refused)}):")
        lines += [
            f"  {r['schema']}: {r['status']} {(r.get('message') or '(no message)')[:80]}" for r in refused
        ]
        invalid = [r for r in server["records"] if r.get("valid") is False]
        if invalid:
            lines.append(f"{labels[side]} finished but invalid ({len(invalid)}):")
            lines += [f"  {r['schema']}: {r['invalid'][:80]}" for r in invalid]
    per_schema = format_table(
        ["schema", *(labels[side] for side in servers)],
        [
            [name["name"], *(_cell(server["records"][i]) for server in servers.values())]
            for i, name in enumerate(result["schemas"])
        ],
        "Per schema (t: completion tokens)",
    )
    return "\n".join(lines) + "\n\n" + per_schema


def render(result: dict[str, Any]) -> str:
    table = format_table(
        [
            "clients",
            "constrained ms/token",
            "unconstrained ms/token",
            "ratio (target <= 1.1)",
            "with jump-forward ms/token",
            "jump-forward gain",
            "valid / finished / sent",
        ],
        [
            [
                r["clients"],
                r["constrained_ms_per_token"],
                r["unconstrained_ms_per_token"],
                f"{r['ratio']:.3f}x" if r["ratio"] is not None else None,
                r.get("jump_forward_ms_per_token"),
                f"{r['jump_forward_gain']:.2f}x" if r.get("jump_forward_gain") else None,
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
    parser.add_argument(
        "--no-peers", dest="peers", action="store_const", const=False, help="skip the comparison with vLLM"
    )
    parser.add_argument(
        "--peers-only", dest="engine", action="store_const", const=False, help="only the comparison with vLLM"
    )
    parser.add_argument("--max-tokens", type=int, help="each structured answer's bound in the peers part")
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    keys = ("model", "clients", "rounds", "threads", "peers", "engine", "max_tokens")
    options = options_from(QUICK if args.quick else DEFAULTS, args, keys)
    result: dict[str, Any] = {"options": options}
    if options["engine"]:
        result = run(options)
        print(render(result))
    if options["peers"]:
        result["peers"] = run_peers(options)
        print(render_peers(result["peers"]))
    write_results(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

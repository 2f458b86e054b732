"""The `bul` command line. Each subcommand parses its arguments and calls into the package; the
output (tables, JSON) is the command's product and goes to stdout, progress goes to the log."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("bulk.cli")

SERVICE_COMMANDS = {
    "serve": "bulk.server.cli",
    "worker": "bulk.integrations.celery.cli",
    "grpc": "bulk.grpc_service.cli",
    "cluster": "bulk.cluster.cli",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul", description="BUL KV: LLM serving with an adaptive KV cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    query = commands.add_parser("query", help="answer one or more queries with one engine, in order")
    query.add_argument("queries", nargs="+", help="query text; later queries reuse earlier ones' KV")
    query.add_argument(
        "--model",
        default="auto",
        help="auto (smollm2-135m when installed, else demo), smollm2-135m, demo, demo-large, a .gguf file "
        "or a Hugging Face model directory",
    )
    query.add_argument("--max-new-tokens", type=int, default=32)
    query.add_argument("--temperature", type=float, default=0.0)
    query.add_argument("--seed", type=int)
    query.add_argument("--block-size", type=int, default=16)
    query.add_argument("--json", action="store_true", help="one JSON result per line")

    bench = commands.add_parser("bench", help="run a benchmark from ./bench (ttft, ...)")
    bench.add_argument("name", help="benchmark name: a module under bench/")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    # Service commands live beside the code they start. Each module exposes `HELP`,
    # `add_arguments(parser)` and `run(args) -> int`, and imports its framework only inside `run`,
    # so `bul query` never pays for FastAPI, gRPC or Celery.
    for name, module_name in SERVICE_COMMANDS.items():
        if not _module_exists(module_name):
            continue
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(service=module)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "query":
        return _query(args)
    if args.command == "bench":
        return _bench(args.name, args.args)
    return int(args.service.run(args) or 0)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is not there either
        return False


def _query(args: argparse.Namespace) -> int:
    from bulk.config import KVCacheConfig
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine
    from bulk.errors import BulError

    config = KVCacheConfig(model=args.model, block_size=args.block_size)
    out = sys.stdout
    with UltraAdaptiveKVCacheEngine(config) as engine:
        for text in args.queries:
            request = {"query": text, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
            if args.seed is not None:
                request["seed"] = args.seed
            try:
                result = engine.process_request_sync(request)
            except BulError as exc:
                log.error("%s", exc)
                return 2
            if args.json:
                out.write(json.dumps(result) + "\n")
                continue
            out.write(
                f"query: {text!r}\n"
                f"  cache_hit={result['cache_hit']} response_cached={result['response_cached']} "
                f"cached_tokens={result['cached_tokens']}/{result['prompt_tokens']} "
                f"ttft={result['ttft_ms']:.1f} ms latency={result['latency']:.1f} ms\n"
                f"  result: {result['result']!r}\n"
            )
    return 0


def _bench(name: str, args: list[str]) -> int:
    # Benchmarks live in the source tree's bench/ (not in the installed package): run from the checkout.
    if not (Path.cwd() / "bench" / f"{name}.py").is_file():
        log.error(
            "no benchmark %r: run `bul bench` from the BUL KV checkout (looked for bench/%s.py)", name, name
        )
        return 2
    sys.path.insert(0, str(Path.cwd()))
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`bul worker`: a Celery worker for the `bul_tasks` app. Celery is imported only in `run`, so `bul`
itself starts fast. Broker, backend and engine come from `BUL_*` variables (docs/integrations.md)."""

from __future__ import annotations

import argparse

HELP = "run a Celery worker for the bul_tasks app (process_document_task, batch_process_task)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=1,
        help="worker processes (prefork) or threads; each process loads its own copy of the model",
    )
    parser.add_argument("-l", "--loglevel", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "-P",
        "--pool",
        default="prefork",
        choices=["prefork", "solo", "threads"],
        help="prefork: one engine per child process; solo: one engine, one task at a time in this "
        "process; threads: one engine shared by the threads",
    )
    parser.add_argument("-Q", "--queues", help="comma-separated queues to consume (default: celery)")
    parser.add_argument("-n", "--hostname", help="worker node name (default: celery@<host>)")
    parser.add_argument(
        "-I",
        "--include",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import MODULE (more tasks that use the same engine); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from bulk.integrations.celery.app import bul_tasks

    argv = ["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}"]
    argv.append(f"--pool={args.pool}")
    if args.queues:
        argv.append(f"--queues={args.queues}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.include:
        argv.append(f"--include={','.join(args.include)}")
    bul_tasks.worker_main(argv)
    return 0

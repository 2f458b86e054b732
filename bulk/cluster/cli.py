"""`bul cluster`: BUL on Ray Serve, N engine replicas behind one API (see docs/cluster.md).

Starts a local Ray instance (or joins the one at `--address` / `BUL_RAY_ADDRESS`), deploys the
application of `bulk.cluster.app` and serves the BUL API on `--port` (`BUL_PORT`, 8002)
until Ctrl-C, which shuts it down. Every `BUL_*` variable of this shell goes to every replica."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulk.cluster.app import ClusterSettings

HELP = "serve the BUL API from N engine replicas on Ray Serve (pip install 'bulk[ray]')"

log = logging.getLogger("bulk.cluster")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, help="engine replicas (BUL_RAY_REPLICAS, default 2)")
    parser.add_argument(
        "--address",
        help="join this Ray cluster (ray://host:10001, or auto for the one on this machine) instead of "
        "starting one (BUL_RAY_ADDRESS)",
    )
    parser.add_argument("--host", help="address the API binds (BUL_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="API port (BUL_PORT, default 8002)")
    parser.add_argument("--model", help="the engines' model (BUL_MODEL), as for `bul serve`")
    parser.add_argument(
        "--router",
        choices=("prefix", "pow2"),
        help="prefix: BUL's prefix-aware router (default); pow2: Ray's power-of-two choices (BUL_RAY_ROUTER)",
    )
    parser.add_argument(
        "--num-cpus", type=int, help="CPUs of the local Ray instance (default: this machine's, at least 2)"
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bulk.errors import InvalidConfigError
    from bulk.server.settings import ServerSettings

    if args.model:
        os.environ["BUL_MODEL"] = args.model
    try:
        from bulk.cluster.app import ClusterSettings
    except ImportError as exc:
        log.error("bul cluster needs Ray Serve: pip install 'bulk[ray]' (%s)", exc)
        return 2
    overrides = {k: getattr(args, k) for k in ("replicas", "address", "router") if getattr(args, k, None)}
    try:
        cluster = ClusterSettings(**overrides)
        flags = {k: getattr(args, k) for k in ("host", "port") if getattr(args, k, None) is not None}
        settings = ServerSettings(**flags)
        settings.engine_config()  # a bad BUL_* value stops here, before Ray starts
    except (ValidationError, InvalidConfigError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    return serve_cluster(cluster, settings.host, settings.port, num_cpus=args.num_cpus)


def serve_cluster(cluster: ClusterSettings, host: str, port: int, num_cpus: int | None = None) -> int:
    """Start or join Ray, deploy the application, serve until SIGINT or SIGTERM, shut down."""
    import ray
    from ray import serve

    from bulk.cluster.app import APP_NAME, bul_application

    env = {k: v for k, v in os.environ.items() if k.startswith("BUL_")}
    address = cluster.address
    if address:
        ray.init(address=address, log_to_driver=False)
        log.info("joined the Ray cluster at %s", address)
    else:
        wanted = math.ceil(cluster.replicas * cluster.replica_cpus)
        cpus = num_cpus or max(os.cpu_count() or 1, wanted, 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance (%d CPUs)", cpus)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(bul_application(cluster, env), name=APP_NAME, route_prefix="/", blocking=False)
        log.info(
            "BUL API on http://%s:%d: %d engine replicas, %s router; Ctrl-C stops",
            host,
            port,
            cluster.replicas,
            cluster.router,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        log.info("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

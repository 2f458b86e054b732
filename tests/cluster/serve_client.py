"""What the cluster tests ask of a running `bul cluster` application: its HTTP API through the Serve
proxy and a handle on its engine deployment, and the replicas' environment (one for the one-node and
the multi-node tests)."""

from __future__ import annotations

import secrets
import socket

import requests
from ray import serve

from bulk.cluster.app import APP_NAME, ENGINE_DEPLOYMENT


def replica_env(redis_url: str) -> dict[str, str]:
    """What every replica of a test cluster is started with: the demo model on the CPU, short
    answers by default, the test's own Redis database as the shared tier (signed with a fresh secret),
    one thread."""
    return {
        "BUL_MODEL": "demo",
        "BUL_DEVICE": "cpu",
        "BUL_DEFAULT_MAX_NEW_TOKENS": "4",
        "BUL_MAX_NEW_TOKENS_LIMIT": "256",
        "BUL_REDIS_URL": redis_url,
        "BUL_CACHE_SECRET": secrets.token_hex(16),
        "BUL_ACCESS_LOG": "false",
        "OMP_NUM_THREADS": "1",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self.handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP_NAME)

    def stats(self) -> dict:
        return requests.get(f"{self.url}/api/stats", timeout=30).json()

    def query(self, text: str, **params) -> dict:
        body = {"query": text, "response_cache": False, **params}
        answer = requests.post(f"{self.url}/api/query", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

"""A real `grpc.aio` server on a free port around an engine sharing the session's demo model."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import grpc
import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.grpc_service.generated import bul_pb2_grpc
from bulk.grpc_service.server import RunningServer, start_server
from tests.helpers import wait_until_async

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(demo_model):
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu"), model=demo_model) as engine:
        yield engine


@pytest.fixture
async def cold_server(engine):
    """Started, not warmed up: health says NOT_SERVING."""
    running = await start_server(engine, "127.0.0.1", 0)
    try:
        yield running
    finally:
        await running.stop(grace=None)


@pytest.fixture
async def server(cold_server: RunningServer) -> RunningServer:
    await cold_server.warm_up()
    return cold_server


@pytest.fixture
async def channel(cold_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cold_server.port}") as channel:
        yield channel


@pytest.fixture
def stub(server, channel) -> bul_pb2_grpc.BULServiceStub:
    return bul_pb2_grpc.BULServiceStub(channel)


@pytest.fixture
def free_port() -> int:
    """A port free a moment ago, for servers in subprocesses (which cannot report a port 0 bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start_process():
    """Start a subprocess with the checkout importable; every one is killed at teardown."""
    processes: list[subprocess.Popen] = []

    def start(args: list[str], **env: str) -> subprocess.Popen:
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env}
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.fixture
def wait_until_answering():
    return _wait_until_answering


async def _wait_until_answering(
    channel: grpc.aio.Channel, process: subprocess.Popen, timeout: float = 60
) -> None:
    """Wait for the server in `process` to accept connections; fail early if it died."""

    async def answering() -> bool:
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"server exited with {process.returncode}:\n{stderr}")
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=0.5)
        except TimeoutError:
            return False
        return True

    await wait_until_async(answering, timeout, 0, "the server to answer")

"""A real uvicorn server on a free port, in a thread of the test process (so it can serve an engine
built on the session's shared demo model)."""

from __future__ import annotations

import socket
import threading

import uvicorn

from tests.helpers import wait_until


class LiveServer:
    def __init__(self, app, ws_max_size: int = 1 << 20) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, ws_max_size=ws_max_size)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        # A thread that died has failed to start: stop waiting at once (wait_until raises its error).
        wait_until(lambda: self._server.started or _dead(self._thread), 30, 0.02, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


def _dead(thread: threading.Thread) -> bool:
    if not thread.is_alive():
        raise RuntimeError("uvicorn did not start")
    return False

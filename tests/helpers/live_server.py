"""uvicorn in a background thread on a free loopback port: the harness of every HTTP test."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class UvicornThread:
    """Serve ``app`` from a daemon thread (its own event loop) on a free loopback port.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        base_url: ``url + "/v1"`` (what the ``openai`` client takes).
        server: the uvicorn server.
    """

    def __init__(self, app: Any, graceful_shutdown: float | None = 2, backlog: int = 256) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        config = uvicorn.Config(
            app, log_config=None, access_log=False, timeout_graceful_shutdown=graceful_shutdown
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()

    def wait_started(self, timeout: float = 20) -> None:
        """Wait until uvicorn accepts connections."""
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "server did not start"

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

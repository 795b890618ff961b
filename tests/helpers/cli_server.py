"""Run the real ``carpool serve`` command in a subprocess and find the URL it serves on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class CliServer:
    """``carpool serve ARGS --port 0`` as a child process; ``url`` once it answers /health."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "carpool.cli", "serve", "--port", "0", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.url: str | None = None

    def wait_ready(self, timeout: float = 300) -> str:
        """Wait until the server logs its URL and /health answers 200; returns the base URL."""
        deadline = time.monotonic() + timeout
        while self.url is None:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"server not up in {timeout}s:\n{self.text()}"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", self.log.read_text())
            self.url = m.group(1) if m else None
            time.sleep(0.2)
        while httpx.get(f"{self.url}/health").status_code != 200:
            assert time.monotonic() < deadline, f"server not healthy:\n{self.text()}"
            time.sleep(0.2)
        return self.url

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

"""What the benchmarks that start a real ``carpool serve`` share (imported from the benchmark
scripts' own folder: ``python benchmarks/x.py`` puts it on ``sys.path``)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# This interpreter's ``carpool`` command line (the checkout's package, whichever ``PYTHONPATH``
# the caller gives): ``[*CARPOOL, "serve", ...]``.
CARPOOL = [sys.executable, "-m", "carpool.cli"]


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerDied(RuntimeError):
    """The server process exited before it was healthy (``returncode`` negative: a signal)."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"the server exited with {returncode} before it was healthy")
        self.returncode = returncode


def wait_healthy(url: str, timeout: float = 300, server: subprocess.Popen | None = None) -> None:
    """Poll ``{url}/health`` until it says ok; RuntimeError after ``timeout`` seconds,
    ServerDied as soon as ``server`` (where given) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise ServerDied(server.returncode)
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def start_server(
    cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``cmd`` (its output to ``log``) and wait until ``{url}/health`` says ok; stopped
    again if it never does (ServerDied: it exited first)."""
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server=server)
    except BaseException:
        if server.poll() is None:
            stop_server(server)
        raise
    return server


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within 60 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()


def bench_serve(url: str, bench_args: list[str], output: Path) -> dict:
    """``carpool bench serve --url {url} {bench_args} --output {output}``; its JSON summary."""
    cmd = [*CARPOOL, "bench", "serve", "--url", url, *bench_args]
    subprocess.run(
        [*cmd, "--output", str(output)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(output.read_text())

"""A hung replica: SIGSTOP one of two ``carpool serve --replicas 2`` processes past the bound.

What must hold (issue 15, item 3): ``/health`` turns degraded within the liveness bound plus a
margin; requests with a ``timeout`` end within a second of their deadline whatever their
replica does; requests that received nothing are retried on the other replica; the frozen
replica is killed and replaced by a new process; traffic then recovers on both replicas.

The router is round-robin so that a burst is split evenly and knowingly between the replicas
(least-loaded would steer around the frozen one by its growing in-transit count).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.cli_server import CliServer

BOUND = 3.0  # --replica-liveness-timeout
MARGIN = 1.5  # detection may take one watchdog tick more, and the machine is shared
TIMEOUT = 1.0  # the requests' own deadline, shorter than the bound: the front end must act
ARGS = [
    "--model", "embedded", "--replicas", "2", "--threads-per-replica", "1",
    "--routing", "round-robin", "--replica-liveness-timeout", str(BOUND),
]  # fmt: skip
PROMPTS = [f"Liveness {i}:" for i in range(4)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CliServer]:
    srv = CliServer(ARGS, tmp_path / "serve.log")
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.stop()


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=5).json()


def wait_health(url: str, ok: Any, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll /health until ``ok(health)``; returns it and when (``time.monotonic()``)."""
    start = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        last = health(url)
        if ok(last):
            return last, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"health condition not met within {timeout}s: {last}")


async def complete(
    http: httpx.AsyncClient, url: str, prompt: str, timeout: float | None = None
) -> tuple[int, Any, float]:
    """(status, text or error code, seconds) of one greedy non-streaming completion."""
    body: dict[str, Any] = {"model": "carpool-default", "prompt": prompt, "max_tokens": 8,
                            "temperature": 0}  # fmt: skip
    if timeout is not None:
        body["timeout"] = timeout
    start = time.monotonic()
    r = await http.post(f"{url}/v1/completions", json=body)
    took = time.monotonic() - start
    data = r.json()
    if r.status_code != 200:
        return r.status_code, data["error"]["code"], took
    return 200, data["choices"][0]["text"], took


def burst(url: str, prompts: list[str], timeout: float | None = None) -> list[Any]:
    async def main() -> list[Any]:
        # The client's own timeout only catches a hang: the server must answer well before.
        async with httpx.AsyncClient(timeout=15) as http:
            return await asyncio.gather(*(complete(http, url, p, timeout) for p in prompts))

    return asyncio.run(main())


def routed(url: str) -> int:
    return sum(r["routed"] for r in health(url)["replicas"])


@pytest.mark.slow
def test_a_stopped_replica_is_noticed_its_deadlines_hold_and_it_is_replaced(server):
    url = server.wait_ready()
    expected = [text for _, text, _ in burst(url, PROMPTS)]  # both replicas answer: warm-up
    before = health(url)
    assert before["status"] == "ok"
    pid0, pid1 = (r["pid"] for r in before["replicas"])

    os.kill(pid0, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        async def scenario() -> tuple[list[Any], list[Any], tuple[dict[str, Any], float]]:
            # /health, watched from the moment the replica stopped.
            watch = asyncio.ensure_future(
                asyncio.to_thread(
                    wait_health,
                    url,
                    lambda h: h["status"] == "degraded" and h["replicas"][0]["state"] != "ready",
                    BOUND + 30,
                )
            )
            # Half of each burst goes to the stopped replica (round-robin, both still "ready").
            sent = await asyncio.to_thread(routed, url)
            timed = asyncio.ensure_future(asyncio.to_thread(burst, url, PROMPTS, TIMEOUT))
            while await asyncio.to_thread(routed, url) < sent + len(PROMPTS):
                await asyncio.sleep(0.02)
            plain = asyncio.ensure_future(asyncio.to_thread(burst, url, PROMPTS))
            return await timed, await plain, await watch

        timed, plain, (down, seen_at) = asyncio.run(scenario())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid0, signal.SIGCONT)  # on failure, let the server shut down cleanly

    # /health: degraded within the bound plus a margin, with the replica's true state.
    assert seen_at - stopped_at <= BOUND + MARGIN, (seen_at - stopped_at, down)
    r0, r1 = down["replicas"]
    assert r0["state"] in ("down", "starting") and r1["state"] == "ready", down
    assert "heartbeat" in (r0["last_error"] or "") or r0["state"] == "starting", r0

    # The timed requests: those on the healthy replica answered, those on the stopped one
    # ended with the timeout error within a second of their deadline.
    statuses = [status for status, _, _ in timed]
    assert sorted(statuses) == [200, 200, 504, 504], timed
    for (status, text, took), exp in zip(timed, expected, strict=True):
        if status == 504:
            assert text == "request_timeout", timed
            assert TIMEOUT - 0.05 <= took <= TIMEOUT + 1.0, timed
        else:
            assert text == exp, timed
    # The requests without a deadline: the two on the stopped replica received nothing, so
    # they were retried on the other one; every answer is the prompt's greedy answer.
    assert [(s, t) for s, t, _ in plain] == [(200, e) for e in expected], plain
    assert max(took for _, _, took in plain) < 15

    # The stopped replica is killed and replaced by a new process; the other one is untouched.
    h, _ = wait_health(url, lambda h: h["status"] == "ok", 60)
    new0, same1 = h["replicas"]
    assert new0["pid"] != pid0 and new0["restarts"] == 1, new0
    assert same1["pid"] == pid1 and same1["restarts"] == 0, same1
    with pytest.raises(ProcessLookupError):
        os.kill(pid0, 0)
    assert time.monotonic() - stopped_at < 60

    # Traffic recovers: both replicas serve, every answer the same as before.
    routed_before = [r["routed"] for r in h["replicas"]]
    again = burst(url, PROMPTS * 2)
    assert [(s, t) for s, t, _ in again] == [(200, e) for e in expected * 2], again
    routed_after = [r["routed"] for r in health(url)["replicas"]]
    assert [b - a for a, b in zip(routed_before, routed_after, strict=True)] == [4, 4]
    assert "no heartbeat" in server.text()

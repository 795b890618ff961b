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
import itertools
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.errors import ReplicaUnavailableError, RequestTimeoutError
from carpool.outputs import RequestOutput
from carpool.replicas import ReplicaPool, ReplicaPoolConfig, ReplicaState
from carpool.replicas.engine_process import Outbox, ReplicaSpec, beat
from carpool.replicas.messages import Heartbeat, LoadReport, StepReport
from carpool.replicas.replica import Pulse
from carpool.replicas.watchdog import LivenessJudge, beat_interval
from helpers.cli_server import CliServer

BOUND = 3.0  # --replica-liveness-timeout
MARGIN = 2.0  # detection may take one watchdog tick (0.75 s) more, and the machine is shared
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
    # Stop it just after a heartbeat: the bursts below are then sent well before it is quiet
    # for half the bound (when the router would stop sending it new requests).
    wait_health(url, lambda h: h["replicas"][0]["heartbeat_age"] < 0.2, 10)

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
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'carpool:replica_hangs_total\{[^}]*replica="0"[^}]*\} 1\.0', metrics)
    assert re.search(r'carpool:replica_hangs_total\{[^}]*replica="1"[^}]*\} 0\.0', metrics)


# ---- the watchdog's logic and the front-end deadlines, without processes --------------------


def test_liveness_judge_finds_the_silent_replica_with_a_fake_clock():
    judge = LivenessJudge(timeout=2.0, now=100.0)
    pulses = {0: Pulse(last=100.0, heard=True), 1: Pulse(last=100.0, heard=True), 2: Pulse()}
    assert judge.silent(pulses, 101.0) == {}
    pulses[1].last = 101.5  # replica 1 beats, replica 0 stops; replica 2 never spoke
    assert judge.silent(pulses, 102.0) == {}  # exactly the bound is not past it
    assert judge.silent(pulses, 102.5) == {0: 2.5}
    pulses[1].last = 103.0
    assert judge.silent(pulses, 103.5) == {0: 3.5}  # still silent; 2 is never judged


def test_liveness_judge_does_not_blame_replicas_for_a_stalled_front_end():
    judge = LivenessJudge(timeout=2.0, now=0.0)
    pulses = {0: Pulse(last=0.0, heard=True), 1: Pulse(last=0.0, heard=True)}
    assert judge.silent(pulses, 0.5) == {}
    # The front end itself stopped for 10 s (its loop, its reader threads): no evidence.
    assert judge.silent(pulses, 10.5) == {}
    pulses[1].last = 10.6  # replica 1's heartbeat arrives once the front end reads again
    assert judge.silent(pulses, 11.0) == {}
    # Silence now counts from the stall's end: replica 0 is judged a bound after it.
    assert judge.silent(pulses, 12.0) == {}
    assert judge.silent(pulses, 12.6) == {0: 12.6}


def test_beat_interval_and_config():
    assert beat_interval(10.0) == 1.0 and beat_interval(2.0) == 0.5
    config = ReplicaPoolConfig(EngineConfig(), liveness_timeout=2.0)
    assert config.spec(1).heartbeat_interval == 0.5
    with pytest.raises(ValueError, match="liveness_timeout"):
        ReplicaPoolConfig(EngineConfig(), liveness_timeout=0)


def _processless_pool() -> ReplicaPool:
    """A 2-replica pool whose replicas are "ready" but have no process (sends go nowhere)."""
    pool = ReplicaPool(ReplicaPoolConfig(EngineConfig(), routing="round-robin"))
    pool._loop = asyncio.get_running_loop()
    for handle in pool.replicas:
        handle.state = ReplicaState.READY
    return pool


def test_the_front_end_ends_a_request_at_its_deadline_whatever_the_replica_does():
    async def main() -> None:
        pool = _processless_pool()
        params = SamplingParams(max_tokens=4)
        start = time.monotonic()
        late = pool.submit([1, 2], params, timeout=0.1)  # its replica never answers
        done = pool.submit([1, 2], params, timeout=0.1)
        free = pool.submit([1, 2], params)  # no deadline: no timer
        assert free.request_id in pool.flights and pool.flights[free.request_id].timer is None
        # The replica answers one request in time: its timer is disarmed.
        flight = pool.flights[done.request_id]
        pool.end(flight)
        assert flight.timer is None and done.request_id not in pool.flights
        with pytest.raises(RequestTimeoutError, match="within its 0.1 s deadline"):
            async for _ in late:
                pass
        assert 0.1 <= time.monotonic() - start < 1.0
        assert set(pool.flights) == {free.request_id}

    asyncio.run(main())


def test_a_hung_replica_is_marked_down_and_its_requests_move_or_fail():
    async def main() -> None:
        pool = _processless_pool()
        params = SamplingParams(max_tokens=4)
        streams = [pool.submit([1, 2], params) for _ in range(4)]  # round-robin: 0, 1, 0, 1
        on_0 = [s for s in streams if pool.flights[s.request_id].replica == 0]
        assert len(on_0) == 2
        started, untouched = on_0
        started.put(RequestOutput(started.request_id, None, [1, 2], [], False))  # a token
        pool.watchdog.on_hung(pool.replicas[0], 12.5)
        r0 = pool.replicas[0]
        assert r0.state is ReplicaState.DOWN and r0.hangs == 1
        assert "no heartbeat for 12.5s" in (r0.last_error or "")
        # The request that received nothing moved to replica 1; the started one failed.
        assert pool.flights[untouched.request_id].replica == 1
        assert pool.flights[untouched.request_id].attempts == 2
        assert started.request_id not in pool.flights
        with pytest.raises(ReplicaUnavailableError, match="stopped answering"):
            async for _ in started:
                pass
        # No traffic to the hung replica, and /health's view says so.
        assert all(pool.flights[pool.submit([3], params).request_id].replica == 1
                   for _ in range(3))  # fmt: skip
        assert [r["state"] for r in pool.describe()] == ["down", "ready"]
        assert pool.describe()[0]["hangs"] == 1

    asyncio.run(main())


def test_the_router_avoids_a_replica_quiet_for_half_the_bound():
    async def main() -> None:
        pool = _processless_pool()  # liveness_timeout 10 s
        params = SamplingParams(max_tokens=4)
        now = time.monotonic()
        pool.replicas[0].pulse = Pulse(last=now - 4.0, heard=True)  # late, not quiet yet
        pool.replicas[1].pulse = Pulse(last=now, heard=True)
        where = [pool.flights[pool.submit([1], params).request_id].replica for _ in range(4)]
        assert sorted(where) == [0, 0, 1, 1]
        pool.replicas[0].pulse.last = now - 6.0  # quiet for more than 5 s: none new
        where = [pool.flights[pool.submit([1], params).request_id].replica for _ in range(4)]
        assert where == [1, 1, 1, 1]
        assert pool.flights[pool.submit([1], params, replica=0).request_id].replica == 0
        pool.replicas[1].pulse.last = now - 6.0  # all quiet: better than refusing
        where = [pool.flights[pool.submit([1], params).request_id].replica for _ in range(4)]
        assert sorted(where) == [0, 0, 1, 1]

    asyncio.run(main())


class _StoppableOutbox(Outbox):
    """An ``Outbox`` whose heartbeats end on ``stopped`` (``beat`` returns on OSError)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.stopped = threading.Event()

    def send(self, msg: Any) -> None:
        if self.stopped.is_set() and isinstance(msg, Heartbeat):
            raise OSError("stopped by the test")
        super().send(msg)


def test_heartbeats_keep_coming_through_a_long_step_and_never_garble_the_pipe():
    """The heartbeat thread beats while the engine's thread computes (torch or pure Python),
    and its messages and the step reports share the pipe whole (``Outbox``'s lock)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = _StoppableOutbox(writer)
    spec = ReplicaSpec(index=3, engine_config=EngineConfig(), heartbeat_interval=0.005)
    received: list[tuple[float, Any]] = []
    garbled: list[BaseException] = []

    def read() -> None:
        try:
            while True:
                received.append((time.monotonic(), reader.recv()))
        except (EOFError, OSError):
            pass
        except Exception as e:  # two writers' bytes interleaved: drain, so no writer blocks
            garbled.append(e)
            with contextlib.suppress(OSError):
                while os.read(reader.fileno(), 1 << 16):
                    pass

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    beating = threading.Thread(target=beat, args=(outbox, spec), daemon=True)
    beating.start()
    start = time.monotonic()
    a = torch.randn(512, 512)
    while time.monotonic() - start < 0.6:  # a long "step" in torch kernels
        a = torch.tanh(a @ a)
    while time.monotonic() - start < 1.2:  # and one in pure Python, holding the GIL
        sum(i * i for i in range(10_000))
    # Larger than the pipe's buffer: their writes are not atomic, a heartbeat could land inside.
    big = [RequestOutput("r", None, list(range(100_000, 150_000)), [], False)]
    for _ in range(100):  # large messages from this thread while heartbeats go out
        outbox.send(StepReport(replica=3, load=LoadReport(), outputs=big))
    time.sleep(0.2)
    # The beats stop before the pipe closes: a beat between Connection's closed-check and its
    # write, with the fd closed and its number reused by the next test's log file, once wrote a
    # heartbeat into that file (CI, sixteenth pass).
    outbox.stopped.set()
    beating.join(5)
    assert not beating.is_alive()
    writer.close()
    reading.join(5)
    assert not garbled, garbled
    beats = [t for t, m in received if isinstance(m, Heartbeat)]
    reports = [m for _, m in received if isinstance(m, StepReport)]
    assert len(reports) == 100 and all(len(r.outputs[0].prompt_token_ids) == 50_000
                                       for r in reports)  # fmt: skip
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert len(beats) >= 10 and max(gaps) < 0.5, gaps

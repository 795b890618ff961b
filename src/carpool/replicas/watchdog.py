"""Replica liveness: a replica process silent for longer than the bound is hung, and replaced.

::

    replica process: heartbeat thread ─► Heartbeat every interval ─► pipe (from before the
                     model loads; outside the engine step, so a long step is no silence)
    front end:       reader thread ─► Pulse.beat() on every message (heartbeats stop there)
                     router: a replica quiet for half the bound gets no new request while
                         another one is heard from (``Watchdog.is_quiet``)
                     event loop, every tick ─► LivenessJudge.silent(pulses, now) ─► hung:
                         state down (no traffic, /health degraded), its requests retried on
                         another replica when they received nothing yet, else failed (503),
                         SIGKILL (a stopped process ignores SIGTERM) ─► the exit path restarts it

A replica's requests also end at their deadline without it: the pool arms a timer per request
(``ReplicaPool.submit``), so a ``timeout`` holds whatever the replica does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from carpool.replicas.replica import Pulse, ReplicaHandle, ReplicaState

if TYPE_CHECKING:
    from carpool.replicas.pool import ReplicaPool

logger = logging.getLogger("carpool.replicas")

_WATCHED = (ReplicaState.READY, ReplicaState.STARTING)


def beat_interval(timeout: float) -> float:
    """Seconds between heartbeats, and between two watchdog ticks, for a liveness bound.

    A quarter of the bound (at most 1 s): a few heartbeats may be late before one counts as
    silent, and a hang is noticed within the bound plus one tick.
    """
    return min(1.0, timeout / 4)


class LivenessJudge:
    """Which replicas were silent for longer than ``timeout`` seconds (pure: no clock inside).

    A tick later than ``timeout`` after the previous one means the front end itself stalled
    (stopped, swapped out, its loop blocked): the replicas' silence meanwhile is no evidence,
    so silence is counted again from that tick.

    Args:
        timeout: the liveness bound in seconds.
        now: the clock at the start (silence counts from here at most).
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self._last_tick = now
        self._since = now

    def silent(self, pulses: Mapping[int, Pulse], now: float) -> dict[int, float]:
        """The replicas judged hung at ``now``, each with how long it has been silent.

        Args:
            pulses: the watched replicas' pulses by index; one never heard from is not judged
                (its interpreter may still be importing).
            now: the clock now.
        """
        if now - self._last_tick > self.timeout:
            logger.warning(
                "replica watchdog: the front end stalled %.1fs; liveness counted from now",
                now - self._last_tick,
            )
            self._since = now
        self._last_tick = now
        return {
            index: now - pulse.last
            for index, pulse in pulses.items()
            if pulse.heard and now - max(pulse.last, self._since) > self.timeout
        }


class Watchdog:
    """Ticks on the pool's event loop; marks a silent replica down and replaces it.

    Args:
        pool: the pool whose replicas it watches (``pool.config.liveness_timeout``).
    """

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.timeout = pool.config.liveness_timeout
        self.judge = LivenessJudge(self.timeout, time.monotonic())
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Tick every ``beat_interval`` seconds until ``cancel`` (call on the event loop)."""
        self.judge = LivenessJudge(self.timeout, time.monotonic())
        self._schedule()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def is_quiet(self, handle: ReplicaHandle) -> bool:
        """``handle`` has been silent for half the bound: the router prefers the others.

        Not yet hung (the watchdog decides at the full bound), but new requests sent there
        would wait for that decision before they are retried elsewhere.
        """
        age = handle.pulse.age()
        return age is not None and age > self.timeout / 2

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(beat_interval(self.timeout), self.tick)

    def tick(self) -> None:
        """Judge the watched replicas now; act on the hung ones."""
        if self.pool.stopping:
            return
        self._schedule()  # first: whatever happens below, the watchdog keeps ticking
        watched = {h.index: h.pulse for h in self.pool.replicas if h.state in _WATCHED}
        for index, silence in self.judge.silent(watched, time.monotonic()).items():
            self.on_hung(self.pool.replicas[index], silence)

    def on_hung(self, handle: ReplicaHandle, silence: float) -> None:
        """``handle`` has been silent for ``silence`` s: down, requests moved, killed."""
        pool = self.pool
        logger.error(
            "replica %d (pid %s) sent no heartbeat for %.1fs (bound %gs): hung or stopped; "
            "killing it (%d requests in flight)",
            handle.index,
            handle.pid,
            silence,
            self.timeout,
            len(pool.in_flight_on(handle.index)),
        )
        handle.last_error = f"no heartbeat for {silence:.1f}s (hung or stopped); killed"
        handle.state = ReplicaState.DOWN  # no traffic from now; the exit path restarts it
        handle.hangs += 1
        pool.restart_policy.reroute(handle, "stopped answering")
        handle.kill()  # SIGKILL: its pipe closes, and RestartPolicy.on_exit takes over
        pool.changed(handle)

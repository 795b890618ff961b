"""``ReplicaPool``: N engine processes behind one front end, an ``EngineClient`` like
``AsyncEngine``, so the HTTP layer serves either without knowing which. Underneath::

    submit ─► router.choose(ready replicas' load) ─► SubmitRequest ─► replica i's inbox
    RequestStream ◄── StepReport.outputs ◄── reader thread ◄── replica i's outbox
    replica i exits ─► its in-flight requests: retried elsewhere when they received nothing
                       yet, else failed with 503 ─► restart after a backoff ─► ready again
    replica i silent past --replica-liveness-timeout ─► Watchdog: down, requests as above,
                       SIGKILL ─► the exit path (restart)
    a request's deadline passes ─► its stream ends with RequestTimeoutError, here, whatever
                       its replica does (the replica holds the same deadline and is told)

Everything the pool owns is touched on the event loop only; the reader threads hand messages
over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.client import EngineObserver, SubmitPath, check_queue
from carpool.engine.core import NewRequest
from carpool.engine.limits import ModelLimits
from carpool.engine.model_path import load_tokenizer, resolve_model_path
from carpool.engine.stats import EngineSnapshot
from carpool.engine.stream import RequestStream
from carpool.engine.view import EngineTap, IterationEvent, TapSet
from carpool.errors import CarpoolError, EngineStoppedError, ReplicaUnavailableError
from carpool.replicas.config import ReplicaPoolConfig
from carpool.replicas.flight import Flight
from carpool.replicas.messages import (
    AbortRequest,
    FromReplica,
    ReplicaCrashed,
    ReplicaReady,
    Shutdown,
    StepReport,
    Watch,
)
from carpool.replicas.replica import ReplicaHandle, ReplicaState
from carpool.replicas.restart import RestartPolicy
from carpool.replicas.router import Candidate, Router, make_router
from carpool.replicas.watchdog import Watchdog
from carpool.tokenizer import Tokenizer

logger = logging.getLogger("carpool.replicas")


class ReplicaPool(SubmitPath):
    """Replica processes behind one router; implements ``EngineClient``.

    Args:
        config: the replicas and the routing.
        observer: engine-level hooks (``ServerMetrics``), called on the event loop.
        replica_observer: called with each replica handle when its state or load changed
            and per dispatch (per-replica metrics).
        router: overrides ``config.routing`` (tests).
        max_queue, request_timeout: admission and default deadline (the server sets them
            from its ``ServerConfig``).
    """

    _id_prefix = "preq"

    def __init__(
        self,
        config: ReplicaPoolConfig,
        observer: EngineObserver | None = None,
        replica_observer: Any = None,
        router: Router | None = None,
        max_queue: int | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.replica_observer = replica_observer
        self.router = router or make_router(config.routing, seed=config.engine_config.seed)
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.replicas = [ReplicaHandle(config.spec(i)) for i in range(config.num_replicas)]
        self.flights: dict[str, Flight] = {}
        self._limits: ModelLimits | None = None  # set by wait_ready
        self._tokenizer: Tokenizer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: asyncio.Event | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self.restart_policy = RestartPolicy(self)
        self.watchdog = Watchdog(self)
        self._taps = TapSet(self._send_watch)

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every replica process (returns once started, not once loaded)."""
        self._loop = asyncio.get_running_loop()
        self._settled = asyncio.Event()
        for handle in self.replicas:
            handle.state = ReplicaState.STARTING
            await asyncio.to_thread(handle.spawn, self._loop, self.on_message, self.on_exit)
        self.watchdog.start()
        ec = self.config.engine_config
        self._tokenizer = await asyncio.to_thread(
            load_tokenizer, resolve_model_path(ec.model, ec.revision, ec.gguf_file)
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every replica loaded (or failed to); then the pool serves.

        Raises:
            CarpoolError: no replica could load the model.
            TimeoutError: not settled within ``timeout`` seconds.
        """
        assert self._settled is not None, "call start() first"
        await asyncio.wait_for(self._settled.wait(), timeout)
        infos = [h.info for h in self.replicas if h.info is not None]
        if not infos:
            errors = "; ".join(f"replica {h.index}: {h.last_error}" for h in self.replicas)
            raise CarpoolError(f"no replica could load the model ({errors})")
        # The tightest limits: a request valid here is valid on every replica.
        self._limits = ModelLimits.smallest([i.limits for i in infos])

    async def shutdown(self) -> None:
        """Abort whatever runs, stop every replica process and wait for them."""
        self._stopping = True
        self.restart_policy.cancel()
        self.watchdog.cancel()
        for handle in self.replicas:
            if handle.process is not None and handle.state is not ReplicaState.STOPPED:
                handle.send(Shutdown())
                handle.state = ReplicaState.STOPPING
        await asyncio.gather(
            *(asyncio.to_thread(h.stop, self.config.stop_timeout) for h in self.replicas)
        )
        for handle in self.replicas:
            self.fail_all(handle, EngineStoppedError("the server shut down"))
            handle.state = ReplicaState.STOPPED

    # ---- EngineClient -----------------------------------------------------------------------

    @property
    def limits(self) -> ModelLimits:
        assert self._limits is not None, "the pool is not ready (await wait_ready())"
        return self._limits

    @property
    def tokenizer(self) -> Tokenizer:
        assert self._tokenizer is not None, "the pool is not started"
        return self._tokenizer

    def clock(self) -> float:
        return time.monotonic()  # system-wide on Linux: the replicas' clock too

    @property
    def is_running(self) -> bool:
        """True while the pool takes requests (some replica is up or coming back)."""
        alive = (ReplicaState.READY, ReplicaState.STARTING, ReplicaState.DOWN)
        return not self._stopping and any(h.state in alive for h in self.replicas)

    @property
    def snapshot(self) -> EngineSnapshot:
        """The whole pool's state: the replicas' latest reports added up."""
        return EngineSnapshot.total([h.load for h in self.replicas if h.info is not None])

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled: in transit or waiting in a replica's scheduler."""
        return sum(h.load.num_waiting + h.in_transit for h in self.replicas if h.is_ready)

    def describe(self) -> list[dict[str, Any]]:
        """Each replica's state, pid and load (for ``/health``)."""
        return [h.describe(len(self.in_flight_on(h.index))) for h in self.replicas]

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless ``num_requests`` more requests may be queued now.

        Raises:
            EngineStoppedError: shutting down or not started.
            ReplicaUnavailableError: no replica is ready (they are restarting).
            QueueFullError: ``max_queue`` requests wait already.
        """
        if self._stopping or self._loop is None:
            raise EngineStoppedError("the replicas are not running (starting or shutting down)")
        if not any(h.is_ready for h in self.replicas):
            states = ", ".join(f"{h.index}: {h.state.value}" for h in self.replicas)
            raise ReplicaUnavailableError(f"no replica is ready ({states}); retry later")
        # Free sequence slots of the ready replicas are no queue (the same rule as AsyncEngine).
        seats = self.config.engine_config.max_num_seqs
        free_slots = sum(max(0, seats - h.load.num_running) for h in self.replicas if h.is_ready)
        check_queue(
            self.max_queue, self.num_waiting, num_requests, free_slots, seats * len(self.replicas)
        )

    def _send(self, request: NewRequest, replica: int | None = None) -> RequestStream:  # type: ignore[override]
        """Route ``request`` (``replica``: to that ready replica instead of the router's)."""
        flight = Flight(RequestStream(request.request_id, self.abort), request)
        self.dispatch(flight, pinned=replica)
        flight.arm(self._expire)
        return flight.stream

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it runs (no-op when unknown or finished)."""
        flight = self.flights.get(request_id)
        if flight is not None:
            self.end(flight)
            self.replicas[flight.replica].send(AbortRequest(request_id))

    def end(self, flight: Flight, error: BaseException | None = None) -> None:
        """``flight`` is over: forget it, disarm its deadline, end its stream with ``error``."""
        if self.flights.get(flight.request_id) is flight:
            del self.flights[flight.request_id]
        flight.disarm()
        if error is not None:
            flight.stream.put(error)

    def _expire(self, flight: Flight) -> None:
        """The deadline passed and the replica did not end the request: end it here."""
        if self.flights.get(flight.request_id) is flight:
            self.end(flight, flight.timeout_error())
            self.replicas[flight.replica].send(AbortRequest(flight.request_id))

    # ---- the live dashboard -----------------------------------------------------------------

    @property
    def engine_config(self) -> EngineConfig:
        return self.config.engine_config

    def add_tap(self, tap: EngineTap) -> Callable[[], None]:
        """Show ``tap`` every replica's iterations (on the event loop); returns its remover."""
        return self._taps.add(tap)

    def _send_watch(self, interval: float | None, only: ReplicaHandle | None = None) -> None:
        for handle in self.replicas if only is None else [only]:
            if handle.is_ready:
                handle.send(Watch(interval))

    # ---- routing ----------------------------------------------------------------------------

    def dispatch(
        self, flight: Flight, exclude: int | None = None, pinned: int | None = None
    ) -> None:
        """Send ``flight`` to the replica the router picks (or ``pinned``)."""
        ready = [h for h in self.replicas if h.is_ready and h.index != exclude]
        if pinned is not None:
            ready = [h for h in ready if h.index == pinned]
        else:  # one quiet for half the liveness bound may be hanging: none new while others beat
            ready = [h for h in ready if not self.watchdog.is_quiet(h)] or ready
        if not ready:
            raise ReplicaUnavailableError("no replica is ready to take the request; retry later")
        candidates = [
            Candidate(
                index=h.index,
                num_running=h.load.num_running,
                num_waiting=h.load.num_waiting,
                in_transit=h.in_transit,
                kv_cache_usage=h.load.kv_cache_usage,
            )
            for h in ready
        ]
        handle = self.replicas[self.router.choose(candidates)]
        handle.send(flight.submit)
        handle.num_sent += 1
        handle.num_routed += 1
        self.flights[flight.submit.request_id] = flight
        flight.replica = handle.index
        flight.attempts += 1
        if self.replica_observer is not None:
            self.replica_observer.on_routed(handle)

    def in_flight_on(self, index: int) -> list[Flight]:
        """The requests replica ``index`` serves now."""
        return [f for f in self.flights.values() if f.replica == index]

    def fail_all(self, handle: ReplicaHandle, error: BaseException) -> None:
        """End every request of ``handle`` with ``error``."""
        for flight in self.in_flight_on(handle.index):
            self.end(flight, error)

    # ---- messages from the replicas (on the event loop) -------------------------------------

    def on_message(self, handle: ReplicaHandle, incarnation: int, msg: FromReplica) -> None:
        if incarnation != handle.incarnation:
            return  # a late message of an earlier incarnation
        if isinstance(msg, StepReport):
            self._on_report(handle, msg)
        elif isinstance(msg, ReplicaReady):
            handle.info = msg
            handle.consecutive_failures = 0
            if handle.state is ReplicaState.STARTING:
                handle.state = ReplicaState.READY
            if self._taps.view_interval is not None:  # a restarted replica starts unwatched
                self._send_watch(self._taps.view_interval, only=handle)
            logger.info("replica %d ready (pid %d, %d KV blocks)", msg.replica, msg.pid,
                        msg.limits.num_blocks)  # fmt: skip
            self.changed(handle)
        elif isinstance(msg, ReplicaCrashed):
            handle.last_error = msg.message

    def _on_report(self, handle: ReplicaHandle, report: StepReport) -> None:
        handle.load = report.load
        for out in report.outputs:
            flight = self.flights.get(out.request_id)
            if flight is not None and flight.replica == handle.index:
                flight.stream.put(out)
                if out.finished:
                    self.end(flight)
        for failure in report.failed:
            flight = self.flights.get(failure.request_id)
            if flight is not None and flight.replica == handle.index:
                self.end(flight, failure.error.to_exception())
        if self._taps.taps:
            self._taps.emit(
                IterationEvent(handle.index, report.record, report.load, report.finished,
                               report.view)
            )  # fmt: skip
        if self.observer is not None:
            self.observer.on_step(report.record, self.snapshot, report.outputs)
            for out, reason in report.finished:
                self.observer.on_request_finished(out, reason)
        self.changed(handle)

    def on_exit(self, handle: ReplicaHandle, incarnation: int) -> None:
        if incarnation == handle.incarnation:
            self.restart_policy.on_exit(handle)

    def changed(self, handle: ReplicaHandle) -> None:
        """A replica's state or load changed: tell the observer, maybe settle ``wait_ready``."""
        if self.replica_observer is not None:
            self.replica_observer.on_replica(handle)
        settled = (ReplicaState.READY, ReplicaState.FAILED)
        if self._settled is not None and all(h.state in settled for h in self.replicas):
            self._settled.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def __aenter__(self) -> ReplicaPool:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.shutdown()

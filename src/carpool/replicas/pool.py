"""``ReplicaPool``: N engine processes behind one front end, with the ``AsyncEngine`` interface.

The HTTP layer (``server/serving.py``) drives a pool exactly as it drives one ``AsyncEngine``:
``check_capacity``, ``submit`` (a stream of ``RequestOutput``), ``abort``, ``snapshot`` and
``engine`` (the model facts it validates requests against). Underneath::

    submit ─► router.choose(ready replicas' load) ─► SubmitRequest ─► replica i's inbox
    RemoteStream ◄── StepReport.outputs ◄── reader thread ◄── replica i's outbox
    replica i exits ─► its in-flight requests: retried elsewhere when they received nothing
                       yet, else failed with 503 ─► restart after a backoff ─► ready again

Everything the pool owns is touched on the event loop only; the reader threads hand messages
over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from carpool.config import EngineConfig
from carpool.engine.async_engine import EngineSnapshot, EngineStoppedError, QueueFullError
from carpool.engine.llm_engine import load_tokenizer, resolve_model_path
from carpool.errors import CarpoolError
from carpool.kv_cache.block_manager import BlockManager
from carpool.outputs import RequestOutput
from carpool.replicas.messages import (
    AbortRequest,
    FromReplica,
    ReplicaCrashed,
    ReplicaReady,
    Shutdown,
    StepReport,
    SubmitRequest,
)
from carpool.replicas.replica import ReplicaHandle, ReplicaState
from carpool.replicas.router import ROUTING_POLICIES, Candidate, Router, make_router
from carpool.replicas.stream import RemoteStream, ReplicaUnavailableError, failure_to_error
from carpool.replicas.worker import ReplicaSpec
from carpool.sampling_params import SamplingParams
from carpool.tokenizer import Tokenizer

logger = logging.getLogger("carpool.replicas")

_MAX_CONSECUTIVE_FAILURES = 5  # a replica that dies this often in a row before ready: failed


@dataclass(frozen=True)
class ReplicaPoolConfig:
    """How many replicas, where, and how requests are spread.

    Attributes:
        engine_config: every replica's engine (its ``device`` is replaced per replica).
        num_replicas: engine processes (>= 1).
        devices: torch devices, cycled over the replicas (empty: ``engine_config.device``).
        routing: one of ``ROUTING_POLICIES``.
        threads_per_replica: torch threads of each replica (None: CPU cores / replicas).
        max_queue: most requests waiting in all replicas together; more get 429.
        request_timeout: default per-request deadline in seconds (None = none).
        restart: restart a replica that died (after it had once been ready).
        restart_backoff: seconds before the first restart; doubles per consecutive failure.
        max_retries: how often a request that received nothing yet is sent to another replica
            when its replica dies.
        stop_timeout: seconds a replica gets to exit on shutdown before it is terminated.
        log_level: the replicas' root log level.
    """

    engine_config: EngineConfig
    num_replicas: int = 2
    devices: tuple[str, ...] = ()
    routing: str = "least-loaded"
    threads_per_replica: int | None = None
    max_queue: int | None = None
    request_timeout: float | None = None
    restart: bool = True
    restart_backoff: float = 1.0
    max_retries: int = 1
    stop_timeout: float = 10.0
    log_level: int = logging.INFO

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be >= 1, got {self.threads_per_replica}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    def spec(self, index: int) -> ReplicaSpec:
        """How replica ``index`` is started."""
        devices = self.devices or (self.engine_config.device,)
        threads = self.threads_per_replica or max(1, (os.cpu_count() or 1) // self.num_replicas)
        return ReplicaSpec(
            index=index,
            engine_config=self.engine_config,
            device=devices[index % len(devices)],
            threads=threads,
            log_level=self.log_level,
        )


class PoolObserver(Protocol):
    """Hooks the pool calls on the event loop (``ServerMetrics`` plus per-replica series)."""

    def on_step(self, record: Any, snapshot: EngineSnapshot, outputs: Sequence[Any]) -> None:
        """After each replica report (``snapshot``: the whole pool)."""

    def on_request_finished(self, output: RequestOutput, reason: str) -> None:
        """A request ended on some replica."""


class ModelView:
    """What the serving layer reads from ``AsyncEngine.engine``, answered for a pool.

    The front end loads only the tokenizer; the limits come from the replicas' ready reports
    (the smallest of each, so a request valid here is valid on every replica).
    """

    def __init__(
        self, config: EngineConfig, tokenizer: Tokenizer, infos: Sequence[ReplicaReady]
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = min(i.max_model_len for i in infos)
        self.num_blocks = min(i.num_blocks for i in infos)
        self.block_manager = BlockManager(self.num_blocks, infos[0].block_size)
        self.model_config = _Vocab(min(i.vocab_size for i in infos))
        self.clock = time.monotonic


@dataclass(frozen=True)
class _Vocab:
    vocab_size: int


class ReplicaPool:
    """Replica processes behind one router, with ``AsyncEngine``'s interface.

    Args:
        config: the replicas and the routing.
        observer: engine-level hooks (``ServerMetrics``), called on the event loop.
        replica_observer: called with each replica handle when its state or load changed
            and with ``(handle, routed=True)`` per dispatch (per-replica metrics).
        router: overrides ``config.routing`` (tests).
    """

    def __init__(
        self,
        config: ReplicaPoolConfig,
        observer: PoolObserver | None = None,
        replica_observer: Any = None,
        router: Router | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.replica_observer = replica_observer
        self.router = router or make_router(config.routing, seed=config.engine_config.seed)
        self.replicas = [ReplicaHandle(config.spec(i)) for i in range(config.num_replicas)]
        self.engine: ModelView | None = None  # set by wait_ready
        self._tokenizer: Tokenizer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: asyncio.Event | None = None
        self._stopping = False
        self._ids = 0
        self._tasks: set[asyncio.Future[Any]] = set()

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every replica process (returns once started, not once loaded)."""
        self._loop = asyncio.get_running_loop()
        self._settled = asyncio.Event()
        for handle in self.replicas:
            handle.state = ReplicaState.STARTING
            await asyncio.to_thread(handle.spawn, self._loop, self._on_message, self._on_exit)
        self._tokenizer = await asyncio.to_thread(
            load_tokenizer, resolve_model_path(self.config.engine_config.model)
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
        assert self._tokenizer is not None
        self.engine = ModelView(self.config.engine_config, self._tokenizer, infos)

    async def shutdown(self) -> None:
        """Abort whatever runs, stop every replica process and wait for them."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for handle in self.replicas:
            if handle.process is not None and handle.state is not ReplicaState.STOPPED:
                handle.send(Shutdown())
                handle.state = ReplicaState.STOPPING
        await asyncio.gather(
            *(asyncio.to_thread(h.stop, self.config.stop_timeout) for h in self.replicas)
        )
        for handle in self.replicas:
            self._fail_all(handle, EngineStoppedError("the server shut down"))
            handle.state = ReplicaState.STOPPED

    @property
    def is_running(self) -> bool:
        """True while the pool takes requests (some replica is up or coming back)."""
        alive = (ReplicaState.READY, ReplicaState.STARTING, ReplicaState.DOWN)
        return not self._stopping and any(h.state in alive for h in self.replicas)

    # ---- load -------------------------------------------------------------------------------

    @property
    def snapshot(self) -> EngineSnapshot:
        """The whole pool's state: the replicas' latest reports added up."""
        loads = [h.load for h in self.replicas if h.info is not None]
        blocks = sum(x.num_blocks for x in loads)
        free = sum(x.num_free_blocks for x in loads)
        steps = sum(x.steps for x in loads)
        return EngineSnapshot(
            num_running=sum(x.num_running for x in loads),
            num_waiting=sum(x.num_waiting for x in loads),
            num_free_blocks=free,
            num_blocks=blocks,
            kv_cache_usage=(blocks - free) / blocks if blocks else 0.0,
            num_unfinished=sum(x.num_unfinished for x in loads),
            steps=steps,
            mean_batch_size=(
                sum(x.mean_batch_size * x.steps for x in loads) / steps if steps else 0.0
            ),
            num_preemptions=sum(x.num_preemptions for x in loads),
            prompt_tokens=sum(x.prompt_tokens for x in loads),
            generation_tokens=sum(x.generation_tokens for x in loads),
            prefix_cache_queries=sum(x.prefix_cache_queries for x in loads),
            prefix_cache_hits=sum(x.prefix_cache_hits for x in loads),
            num_preemptions_kv_cache=sum(x.num_preemptions_kv_cache for x in loads),
            num_preemptions_priority=sum(x.num_preemptions_priority for x in loads),
        )

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled: in transit or waiting in a replica's scheduler."""
        return sum(h.load.num_waiting + h.in_transit for h in self.replicas if h.is_ready)

    def describe(self) -> list[dict[str, Any]]:
        """Each replica's state, pid and load (for ``/health``)."""
        return [h.describe() for h in self.replicas]

    # ---- requests (on the event loop) -------------------------------------------------------

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
        max_queue = self.config.max_queue
        if max_queue is not None and self.num_waiting + num_requests > max_queue:
            raise QueueFullError(
                f"too many requests are waiting (max_queue={max_queue}); retry later"
            )

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        arrival_time: float | None = None,
        replica: int | None = None,
    ) -> RemoteStream:
        """Route a request to a replica now (call from the event loop).

        Args:
            prompt, params, request_id, timeout, arrival_time: as ``AsyncEngine.submit``.
            replica: send it to this replica instead of asking the router (it must be ready).

        Raises:
            EngineStoppedError, ReplicaUnavailableError, QueueFullError: see
            ``check_capacity``.
        """
        self.check_capacity()
        if request_id is None:
            self._ids += 1
            request_id = f"preq-{self._ids}"
        now = time.monotonic()
        timeout = self.config.request_timeout if timeout is None else timeout
        msg = SubmitRequest(
            request_id=request_id,
            prompt=prompt,
            params=params,
            arrival_time=now if arrival_time is None else arrival_time,
            deadline=None if timeout is None else now + timeout,
            timeout=timeout,
        )
        stream = RemoteStream(msg, self.abort)
        self._dispatch(stream, pinned=replica)
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it runs (no-op when unknown or finished)."""
        for handle in self.replicas:
            if handle.streams.pop(request_id, None) is not None:
                handle.send(AbortRequest(request_id))
                return

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as ``AsyncEngine.generate`` does."""
        stream = self.submit(prompt, params, request_id, timeout)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _dispatch(
        self, stream: RemoteStream, exclude: int | None = None, pinned: int | None = None
    ) -> None:
        ready = [h for h in self.replicas if h.is_ready and h.index != exclude]
        if pinned is not None:
            ready = [h for h in ready if h.index == pinned]
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
        handle.send(stream.submit)
        handle.num_sent += 1
        handle.num_routed += 1
        handle.streams[stream.request_id] = stream
        stream.replica = handle.index
        stream.attempts += 1
        if self.replica_observer is not None:
            self.replica_observer.on_routed(handle)

    # ---- messages from the replicas (on the event loop) -------------------------------------

    def _on_message(self, handle: ReplicaHandle, incarnation: int, msg: FromReplica) -> None:
        if incarnation != handle.incarnation:
            return  # a late message of an earlier incarnation
        if isinstance(msg, StepReport):
            self._on_report(handle, msg)
        elif isinstance(msg, ReplicaReady):
            handle.info = msg
            handle.consecutive_failures = 0
            if handle.state is ReplicaState.STARTING:
                handle.state = ReplicaState.READY
            logger.info("replica %d ready (pid %d, %d KV blocks)", msg.replica, msg.pid,
                        msg.num_blocks)  # fmt: skip
            self._changed(handle)
        elif isinstance(msg, ReplicaCrashed):
            handle.last_error = msg.message

    def _on_report(self, handle: ReplicaHandle, report: StepReport) -> None:
        handle.load = report.load
        for out in report.outputs:
            stream = handle.streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del handle.streams[out.request_id]
        for failure in report.failed:
            stream = handle.streams.pop(failure.request_id, None)
            if stream is not None:
                stream.put(failure_to_error(failure))
        if self.observer is not None:
            self.observer.on_step(report.record, self.snapshot, report.outputs)
            for out, reason in report.finished:
                self.observer.on_request_finished(out, reason)
        self._changed(handle)

    def _on_exit(self, handle: ReplicaHandle, incarnation: int) -> None:
        if incarnation != handle.incarnation:
            return
        process = handle.process
        code = process.exitcode if process is not None else None
        handle.close_inbox()
        was_ready = handle.info is not None
        handle.info = None
        if self._stopping or handle.state is ReplicaState.STOPPING:
            handle.state = ReplicaState.STOPPED
            self._fail_all(handle, EngineStoppedError("the server shut down"))
            return
        logger.error(
            "replica %d (pid %s) exited with code %s; %d requests in flight",
            handle.index,
            handle.pid,
            code,
            len(handle.streams),
        )
        handle.last_error = handle.last_error or f"the process exited with code {code}"
        handle.state = ReplicaState.DOWN
        self._reroute(handle)
        handle.load = type(handle.load)()
        if not was_ready:
            handle.consecutive_failures += 1
        never_ready = handle.restarts == 0 and not was_ready
        if (
            not self.config.restart
            or never_ready
            or handle.consecutive_failures >= _MAX_CONSECUTIVE_FAILURES
        ):
            handle.state = ReplicaState.FAILED
            logger.error("replica %d is not restarted: %s", handle.index, handle.last_error)
        else:
            delay = self.config.restart_backoff * 2 ** min(handle.consecutive_failures, 5)
            assert self._loop is not None
            self._loop.call_later(delay, self._spawn_restart, handle)
        self._changed(handle)
        self._check_settled()

    def _reroute(self, handle: ReplicaHandle) -> None:
        """The dead replica's requests: retry those that received nothing, fail the others."""
        streams, handle.streams = handle.streams, {}
        for stream in streams.values():
            if stream.received == 0 and stream.attempts <= self.config.max_retries:
                try:
                    self._dispatch(stream, exclude=handle.index)
                    logger.info("request %s retried on replica %d", stream.request_id,
                                stream.replica)  # fmt: skip
                    continue
                except ReplicaUnavailableError:
                    pass
            stream.put(
                ReplicaUnavailableError(
                    f"replica {handle.index} serving request {stream.request_id} died "
                    f"({handle.last_error}); retry the request"
                )
            )

    def _spawn_restart(self, handle: ReplicaHandle) -> None:
        if self._stopping or handle.state is not ReplicaState.DOWN:
            return
        handle.state = ReplicaState.STARTING
        handle.restarts += 1
        handle.last_error = None
        assert self._loop is not None
        task = asyncio.ensure_future(
            asyncio.to_thread(handle.spawn, self._loop, self._on_message, self._on_exit)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._changed(handle)

    def _fail_all(self, handle: ReplicaHandle, error: BaseException) -> None:
        streams, handle.streams = handle.streams, {}
        for stream in streams.values():
            stream.put(error)

    def _changed(self, handle: ReplicaHandle) -> None:
        if self.replica_observer is not None:
            self.replica_observer.on_replica(handle)
        self._check_settled()

    def _check_settled(self) -> None:
        settled = (ReplicaState.READY, ReplicaState.FAILED)
        if self._settled is not None and all(h.state in settled for h in self.replicas):
            self._settled.set()

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

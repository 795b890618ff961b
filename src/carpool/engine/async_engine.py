"""``AsyncEngine``: an ``LLMEngine`` stepped by its own thread, fed by asyncio callers.

::

    event loop (HTTP handlers)                 engine thread (the only caller of LLMEngine)
    ─────────────────────────                  ───────────────────────────────────────────
    generate() ─► inbox.append(add) ─notify─►  drain inbox: add_request / abort
       ▲                                       expire deadlines (abort, send a timeout)
       │ asyncio.Queue per request             step()  ─► outputs
       └──── loop.call_soon_threadsafe ◄──────  dispatch each output to its request's queue
                                               sleep on the condition variable when idle

The engine thread never polls: with nothing to do it waits on a condition variable until a new
request or an abort arrives, or until the earliest of ``engine.next_wake_time()`` (a batching
timer) and the nearest request deadline. A forward pass never runs on the event loop, so the HTTP
side stays responsive during a long step.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from carpool.engine.llm_engine import LLMEngine, StepRecord
from carpool.errors import CarpoolError, EngineDeadError
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams

logger = logging.getLogger("carpool.engine")
request_logger = logging.getLogger("carpool.request")

_Snapshot = TypeVar("_Snapshot", bound="EngineSnapshot")


class QueueFullError(CarpoolError):
    """Too many requests wait already (``max_queue``); the caller should retry later."""


class EngineStoppedError(CarpoolError):
    """The engine is shutting down (or not started) and takes no new requests."""


class RequestTimeoutError(CarpoolError):
    """The request passed its deadline; it was aborted and its KV blocks freed."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after the latest loop iteration (safe to read from any thread).

    Attributes:
        num_running: requests holding a seat in the batch.
        num_waiting: requests queued in the scheduler plus those still in the inbox.
        num_free_blocks, num_blocks: KV cache blocks free and in total.
        kv_cache_usage: fraction of KV blocks in use, in [0, 1].
        num_unfinished: requests the engine still holds (any state).
        steps: forward passes so far.
        mean_batch_size: mean sequences per forward pass.
        num_preemptions: running requests that lost their KV so far.
        prompt_tokens, generation_tokens: tokens computed / generated so far.
        prefix_cache_queries, prefix_cache_hits: prompt tokens looked up in the prefix cache at
            admission, and of those the tokens found cached (their prefill skipped).
        num_preemptions_kv_cache, num_preemptions_priority: ``num_preemptions`` by cause.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_unfinished: int = 0
    steps: int = 0
    mean_batch_size: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions_kv_cache: int = 0
    num_preemptions_priority: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """prefix_cache_hits / prefix_cache_queries (0.0 before any query)."""
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0

    @classmethod
    def from_engine(cls: type[_Snapshot], engine: LLMEngine, **extra: Any) -> _Snapshot:
        """Read the figures off ``engine`` (call from the thread that owns it).

        ``extra`` fills the fields a subclass adds (the replicas' ``LoadReport``).
        """
        bm, stats = engine.block_manager, engine.stats
        by_cause = engine.policy.stats.num_preemptions_by_cause
        return cls(
            num_running=engine.policy.num_running,
            num_waiting=engine.policy.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=engine.num_blocks,
            kv_cache_usage=bm.usage,
            num_unfinished=engine.num_requests,
            steps=stats.steps,
            mean_batch_size=stats.mean_batch_size,
            num_preemptions=engine.policy.stats.num_preemptions,
            prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generated_tokens,
            prefix_cache_queries=bm.prefix_cache_stats.queries,
            prefix_cache_hits=bm.prefix_cache_stats.hits,
            num_preemptions_kv_cache=by_cause.get("kv_cache", 0),
            num_preemptions_priority=by_cause.get("priority", 0),
            **extra,
        )


class EngineObserver(Protocol):
    """Hooks the engine thread calls (e.g. Prometheus metrics). They must be quick."""

    def on_step(
        self, record: StepRecord | None, snapshot: EngineSnapshot, outputs: Sequence[RequestOutput]
    ) -> None:
        """After each loop iteration that stepped (``record``) or changed the engine state."""

    def on_request_finished(self, output: RequestOutput, reason: str) -> None:
        """A request ended; ``reason`` is stop, length, abort, error or timeout."""


class RequestStream:
    """The event-loop end of one submitted request: iterate it for the request's outputs.

    Made by ``AsyncEngine.submit``. Whoever submits owns the request: if it stops iterating
    before ``finished``, it must call ``abort()`` (idempotent), or the request runs to its end.
    """

    def __init__(
        self, engine: AsyncEngine, request_id: str, deadline: float | None, timeout: float | None
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.timeout = timeout
        self.finished = False
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand ``item`` to the consumer (called from the engine thread)."""
        # RuntimeError: the consumer's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True  # the engine thread already dropped the request
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        """Abort the request unless it finished (frees its KV blocks within one step)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Inbox:
    """Work handed to the engine thread; guarded by ``AsyncEngine._cond``."""

    items: deque[_Add | _Abort] = field(default_factory=deque)
    num_adds: int = 0


class AsyncEngine:
    """Runs an ``LLMEngine`` in a background thread and streams outputs to asyncio callers.

    Args:
        engine: the engine to drive. Only the engine thread calls it once ``start`` ran.
        max_queue: most requests that may wait (not yet scheduled) before ``generate`` raises
            ``QueueFullError``; None = unbounded.
        request_timeout: default deadline in seconds of every request (None = none).
        observer: hooks called from the engine thread (metrics).
        log_interval: seconds between the periodic engine log lines while busy.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int | None = None,
        request_timeout: float | None = None,
        observer: EngineObserver | None = None,
        log_interval: float = 5.0,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.observer = observer
        self.log_interval = log_interval
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._deadlines: list[tuple[float, str]] = []  # heap, engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._snapshot = EngineSnapshot(
            num_blocks=engine.num_blocks, num_free_blocks=engine.block_manager.num_free_blocks
        )
        self._last_log = time.monotonic()
        self._last_log_tokens = 0

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="carpool-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Abort whatever is still running, stop the thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        """True while the engine thread serves requests."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._stopping
            and self._dead is None
        )

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's state after the latest loop iteration."""
        return self._snapshot

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled: still in the inbox or waiting in the scheduler."""
        with self._cond:
            return self._inbox.num_adds + self._snapshot.num_waiting

    # ---- the asyncio side -------------------------------------------------------------------

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless ``num_requests`` more requests may be queued now.

        Raises:
            EngineStoppedError: shutting down, not started, or the engine failed.
            QueueFullError: ``max_queue`` requests wait already.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine failed: {self._dead}")
        if not self.is_running:
            raise EngineStoppedError("the engine is not running (starting or shutting down)")
        if self.max_queue is not None and self.num_waiting + num_requests > self.max_queue:
            raise QueueFullError(
                f"too many requests are waiting (max_queue={self.max_queue}); retry later"
            )

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request for the engine thread now (call from a running event loop).

        Args:
            prompt, params, request_id, timeout, arrival_time: as for ``generate``.

        Returns:
            The stream of the request's outputs; the caller must ``abort()`` it if it stops
            reading before the end.

        Raises:
            EngineStoppedError, EngineDeadError, QueueFullError: see ``check_capacity``.
        """
        self.check_capacity()
        rid = request_id if request_id is not None else f"areq-{next(self._ids)}"
        now = self.engine.clock()
        timeout = self.request_timeout if timeout is None else timeout
        stream = RequestStream(self, rid, None if timeout is None else now + timeout, timeout)
        with self._cond:
            self._inbox.items.append(
                _Add(stream, prompt, params, now if arrival_time is None else arrival_time)
            )
            self._inbox.num_adds += 1
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request (no-op when unknown or finished)."""
        with self._cond:
            self._inbox.items.append(_Abort(request_id))
            self._cond.notify()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output each step it progresses, the last one ``finished``.

        Leaving the loop early (a disconnect cancels the task, or the consumer closes the
        generator) aborts the request, which frees its KV blocks within one engine step.

        Args:
            prompt: text or token ids.
            params: sampling parameters.
            request_id: unique id (a new one when None).
            timeout: seconds before the request is ended with ``RequestTimeoutError``
                (default: the engine's ``request_timeout``).
            arrival_time: when the request arrived (engine clock), for the queue-time metric.

        Raises:
            QueueFullError, EngineStoppedError, EngineDeadError: before anything is queued.
            InvalidRequestError: the engine rejected the request (nothing was generated).
            RequestTimeoutError: the deadline passed (outputs so far were yielded).
        """
        stream = self.submit(prompt, params, request_id, timeout, arrival_time)
        try:
            async for out in stream:
                yield out
        finally:  # GeneratorExit (consumer left) or CancelledError (task cancelled)
            stream.abort()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug in the engine: fail every request, keep the process up
            logger.exception("engine thread failed; every request fails from now on")
            self._dead = e
            with self._cond:
                for stream in self._streams.values():
                    stream.put(EngineDeadError(f"the engine failed: {e}"))
                self._streams.clear()
                for item in self._inbox.items:
                    if isinstance(item, _Add):
                        item.stream.put(EngineDeadError(f"the engine failed: {e}"))
                self._inbox.items.clear()
                self._inbox.num_adds = 0

    def _loop(self) -> None:
        engine = self.engine
        stalled = False  # the last step found nothing to schedule: wait for news
        while True:
            with self._cond:
                while True:
                    if self._drain_inbox():
                        stalled = False
                    if self._stopping:
                        self._abort_all()
                        self._publish(None, [])
                        return
                    if self._expire_deadlines():
                        stalled = False
                    if engine.has_unfinished() and not stalled:
                        break
                    timeout = self._sleep_time()
                    if timeout is not None and timeout <= 0:
                        stalled = False
                        continue
                    self._cond.wait(timeout)
                    stalled = False  # woken: by news or by a timer; either may unblock a step
            steps_before = engine.stats.steps
            outputs = engine.step()
            stepped = engine.stats.steps != steps_before
            stalled = not stepped and not outputs
            for out in outputs:
                self._dispatch(out)
            self._publish(engine.stats.records[-1] if stepped else None, outputs)
            self._maybe_log()

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts (lock held). Returns True when there were any."""
        inbox = self._inbox
        if not inbox.items:
            return False
        changed: list[RequestOutput] = []
        while inbox.items:
            item = inbox.items.popleft()
            if isinstance(item, _Add):
                inbox.num_adds -= 1
                self._add(item)
            else:
                out = self.engine.abort(item.request_id)
                if out is not None:
                    changed.append(out)
                    self._finish(out, "abort")
        self._publish(None, changed)
        return True

    def _add(self, item: _Add) -> None:
        stream = item.stream
        if self._stopping:
            stream.put(EngineStoppedError("the server is shutting down"))
            return
        try:
            self.engine.add_request(item.prompt, item.params, stream.request_id, item.arrival_time)
        except Exception as e:  # InvalidRequestError, or anything a bad input provokes
            stream.put(e)
            return
        self._streams[stream.request_id] = stream
        if stream.deadline is not None:
            heapq.heappush(self._deadlines, (stream.deadline, stream.request_id))

    def _expire_deadlines(self) -> bool:
        """Abort requests past their deadline; their consumers get ``RequestTimeoutError``."""
        now = self.engine.clock()
        expired = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            stream = self._streams.get(rid)
            out = self.engine.abort(rid)
            if stream is None or out is None:
                continue  # finished meanwhile
            expired = True
            self._finish(out, "timeout")
            stream.put(
                RequestTimeoutError(
                    f"request {rid} timed out: not finished within its "
                    f"{stream.timeout:g} s deadline"
                )
            )
        if expired:
            self._publish(None, [])
        return expired

    def _sleep_time(self) -> float | None:
        """Seconds until the next batching timer or deadline; None = until notified."""
        times = [
            t
            for t in (
                self.engine.next_wake_time(),
                self._deadlines[0][0] if self._deadlines else None,
            )
            if t is not None
        ]
        return min(times) - self.engine.clock() if times else None

    def _dispatch(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)
        if out.finished:
            reasons = {o.finish_reason for o in out.outputs}
            reason = next((r for r in ("error", "abort", "length", "stop") if r in reasons), "stop")
            self._finish(out, reason)

    def _finish(self, out: RequestOutput, reason: str) -> None:
        self._streams.pop(out.request_id, None)
        if self.observer is not None:
            self.observer.on_request_finished(out, reason)
        t = out.timings[0] if out.timings else None
        ttft = f"{t.ttft:.3f}s" if t is not None and t.ttft is not None else "-"
        e2e = f"{t.e2e:.3f}s" if t is not None and t.e2e is not None else "-"
        request_logger.info(
            "request id=%s prompt_tokens=%d generated_tokens=%d ttft=%s latency=%s "
            "finish_reason=%s",
            out.request_id,
            len(out.prompt_token_ids),
            out.num_generated_tokens,
            ttft,
            e2e,
            reason,
        )

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            stream = self._streams[rid]
            out = self.engine.abort(rid)
            if out is not None:
                self._finish(out, "abort")
            stream.put(EngineStoppedError("the server shut down before the request finished"))
        self._streams.clear()

    def _publish(self, record: StepRecord | None, outputs: Sequence[RequestOutput]) -> None:
        self._snapshot = EngineSnapshot.from_engine(self.engine)
        if self.observer is not None:
            self.observer.on_step(record, self._snapshot, outputs)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_interval:
            return
        s = self._snapshot
        rate = (s.generation_tokens - self._last_log_tokens) / (now - self._last_log)
        logger.info(
            "engine running=%d waiting=%d kv_usage=%.1f%% generation_tokens/s=%.1f "
            "mean_batch_size=%.2f preemptions=%d prefix_cache_hit_rate=%.1f%%",
            s.num_running,
            s.num_waiting,
            100 * s.kv_cache_usage,
            rate,
            s.mean_batch_size,
            s.num_preemptions,
            100 * s.prefix_cache_hit_rate,
        )
        self._last_log, self._last_log_tokens = now, s.generation_tokens

"""``EngineCore``: the serving loop around ``LLMEngine``, written once.

It owns the inbox (new requests and aborts from any thread), the request deadlines, the idle
wait and the step, and says after each iteration what happened (``CoreStep``). The two
transports only move messages: ``AsyncEngine`` (a thread, results to asyncio streams) and the
replica process (``replicas/engine_process.py``, results over a pipe)::

    any thread: add_request / abort_request / shutdown ─► inbox (deque + condition variable)
    owner thread, each iteration (``step``):
        take the inbox ─► add (a bad request -> failed) / abort
        expire deadlines ─► abort, failed with RequestTimeoutError
        nothing to do? wait on the condition until news, a batching timer or a deadline
        LLMEngine.run_step() ─► outputs, finished (with reasons), record (None: model idle)

The loop never polls: with nothing to do it sleeps until a message arrives or until the
earliest of ``engine.next_wake_time()`` (a batching timer) and the nearest deadline.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from carpool.engine.llm_engine import LLMEngine
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.view import EngineView, build_view
from carpool.errors import CarpoolError, EngineStoppedError, RequestTimeoutError, as_carpool_error
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams

logger = logging.getLogger("carpool.engine")

# When a request ends with several completions, the one reason reported (metrics, logs).
_REASON_PRIORITY = ("error", "abort", "length", "stop")


@dataclass(frozen=True)
class NewRequest:
    """A request for the core (also what a replica receives over its inbox).

    Attributes:
        request_id: unique id.
        prompt: text or token ids.
        params: sampling parameters.
        arrival_time: when the request arrived (engine clock, ``time.monotonic`` by default).
        deadline: clock time after which it is aborted with ``RequestTimeoutError``.
        timeout: the timeout the deadline came from (for the error message).
    """

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    deadline: float | None = None
    timeout: float | None = None

    @classmethod
    def at(
        cls,
        now: float,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        timeout: float | None,
        arrival_time: float | None,
    ) -> NewRequest:
        """A request submitted at ``now`` (arrival defaults to now; deadline = now + timeout)."""
        return cls(
            request_id=request_id,
            prompt=prompt,
            params=params,
            arrival_time=now if arrival_time is None else arrival_time,
            deadline=None if timeout is None else now + timeout,
            timeout=timeout,
        )


@dataclass(frozen=True)
class CoreStep:
    """What one iteration of the loop did.

    Attributes:
        outputs: per request that progressed, its output (to its stream).
        finished: ``(final output, reason)`` of requests that ended, reason one of stop,
            length, abort, error, timeout (for metrics and logs).
        failed: ``(request id, error)`` of requests that ended with an error instead of a
            final output (invalid, timed out, shut down).
        record: the forward pass's figures; None when the model did not run.
        snapshot: the engine's figures after the iteration.
        num_added: requests taken from the inbox so far (a replica's front end subtracts it
            from what it sent to know how many are in transit).
        stopped: the core shut down; this is its last step.
        view: the engine's requests and blocks, when ``view_interval`` asked for one.
    """

    outputs: list[RequestOutput]
    finished: list[tuple[RequestOutput, str]]
    failed: list[tuple[str, CarpoolError]]
    record: StepRecord | None
    snapshot: EngineSnapshot
    num_added: int
    stopped: bool = False
    view: EngineView | None = None


def finish_reason(out: RequestOutput) -> str:
    """The one reason a finished request is reported with (its completions' worst)."""
    reasons = {o.finish_reason for o in out.outputs}
    return next((r for r in _REASON_PRIORITY if r in reasons), "stop")


@dataclass
class _Iteration:
    outputs: list[RequestOutput] = field(default_factory=list)
    finished: list[tuple[RequestOutput, str]] = field(default_factory=list)
    failed: list[tuple[str, CarpoolError]] = field(default_factory=list)
    changed: bool = False


class _Stop:
    """Inbox marker: abort everything and end the loop."""


class EngineCore:
    """The step loop over one ``LLMEngine`` (which only the owner thread touches).

    Args:
        engine: the engine to drive.

    Attributes:
        view_interval: while set (someone watches the dashboard), an iteration carries an
            ``EngineView`` when the last one is this many seconds old, and always once the
            engine fell idle (so a viewer sees the blocks freed). Any thread may set it.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.view_interval: float | None = None
        self._last_view = float("-inf")
        self.num_added = 0
        self._cond = threading.Condition()
        self._inbox: deque[NewRequest | str | _Stop] = deque()  # str: an abort
        self._num_pending_adds = 0
        self._active: set[str] = set()  # ids the engine holds
        self._deadlines: list[tuple[float, str, float]] = []  # (deadline, id, timeout) heap
        self._stalled = False  # the last step found nothing to schedule: wait for news
        self._stopping = False

    # ---- any thread -------------------------------------------------------------------------

    def add_request(self, request: NewRequest) -> None:
        """Queue a new request for the next iteration."""
        with self._cond:
            self._inbox.append(request)
            self._num_pending_adds += request.params.n  # sequences: admission counts those
            self._cond.notify()

    def abort_request(self, request_id: str) -> None:
        """Abort a request at the next iteration (no-op when unknown or finished)."""
        with self._cond:
            self._inbox.append(request_id)
            self._cond.notify()

    def shutdown(self) -> None:
        """Abort everything at the next iteration and end the loop."""
        with self._cond:
            self._inbox.append(_Stop())
            self._cond.notify()

    @property
    def num_pending_adds(self) -> int:
        """Sequences (a request's ``n``) queued in the inbox, not yet handed to the engine."""
        return self._num_pending_adds

    # ---- the owner thread -------------------------------------------------------------------

    def run(self, emit: Callable[[CoreStep], None]) -> None:
        """Iterate until ``shutdown``; ``emit`` every iteration that changed anything."""
        while True:
            step = self.step()
            if step is not None:
                emit(step)
                if step.stopped:
                    return

    def step(self) -> CoreStep | None:
        """One iteration: take the inbox, expire deadlines, run the engine once, or wait.

        Returns:
            What happened, or None when the iteration changed nothing (it waited).
        """
        it = _Iteration()
        with self._cond:
            items = self._take_inbox()
            if not items and not self._has_work():
                self._cond.wait(self._sleep_time())
                self._stalled = False  # woken by news or a timer; either may unblock a step
                items = self._take_inbox()
        for item in items:
            self._apply(item, it)
        if items:
            self._stalled = False
        if self._stopping:
            self._abort_all(it)
            return self._result(it, None, stopped=True)
        if self._expire_deadlines(it):
            self._stalled = False
        record = None
        if self._has_work():
            result = self.engine.run_step()
            self._stalled = result.record is None and not result.outputs
            record = result.record
            for out in result.outputs:
                it.outputs.append(out)
                if out.finished:
                    self._active.discard(out.request_id)
                    it.finished.append((out, finish_reason(out)))
        if it.changed or it.outputs or record is not None:
            return self._result(it, record)
        return None

    def _has_work(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        wake = self.engine.next_wake_time()
        if wake is not None and wake <= self.engine.clock():
            self._stalled = False  # a batching timer is due
        return not self._stalled

    def _take_inbox(self) -> list[NewRequest | str | _Stop]:
        items = list(self._inbox)
        self._inbox.clear()
        self._num_pending_adds = 0
        return items

    def _apply(self, item: NewRequest | str | _Stop, it: _Iteration) -> None:
        it.changed = True
        if isinstance(item, _Stop):
            self._stopping = True
        elif isinstance(item, str):
            self._active.discard(item)
            out = self.engine.abort(item)
            if out is not None:
                it.finished.append((out, "abort"))
        else:
            self.num_added += 1
            self._add(item, it)

    def _add(self, req: NewRequest, it: _Iteration) -> None:
        if self._stopping:
            it.failed.append((req.request_id, EngineStoppedError("the server is shutting down")))
            return
        try:
            self.engine.add_request(req.prompt, req.params, req.request_id, req.arrival_time)
        except Exception as e:  # InvalidRequestError, or anything a bad input provokes
            if not isinstance(e, CarpoolError):
                logger.exception("request %s could not be added", req.request_id)
            it.failed.append((req.request_id, as_carpool_error(e)))
            return
        self._active.add(req.request_id)
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, req.request_id, req.timeout or 0.0))

    def _expire_deadlines(self, it: _Iteration) -> bool:
        """Abort requests past their deadline; they fail with ``RequestTimeoutError``."""
        now = self.engine.clock()
        expired = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid, timeout = heapq.heappop(self._deadlines)
            self._active.discard(rid)
            out = self.engine.abort(rid)
            if out is None:
                continue  # finished meanwhile
            expired = it.changed = True
            it.finished.append((out, "timeout"))
            message = f"request {rid} timed out: not finished within its {timeout:g} s deadline"
            it.failed.append((rid, RequestTimeoutError(message)))
        return expired

    def _sleep_time(self) -> float | None:
        """Seconds until the next batching timer or deadline; None = until notified."""
        times = [t for t in (self.engine.next_wake_time(),) if t is not None]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if not times:
            return None
        return max(0.0, min(times) - self.engine.clock())

    def _abort_all(self, it: _Iteration) -> None:
        for rid in sorted(self._active):
            out = self.engine.abort(rid)
            if out is not None:
                it.finished.append((out, "abort"))
                message = "the server shut down before the request finished"
                it.failed.append((rid, EngineStoppedError(message)))
        self._active.clear()

    def _result(self, it: _Iteration, record: StepRecord | None, stopped: bool = False) -> CoreStep:
        return CoreStep(
            outputs=it.outputs,
            finished=it.finished,
            failed=it.failed,
            record=record,
            snapshot=self.engine.snapshot(),
            num_added=self.num_added,
            stopped=stopped,
            view=self._maybe_view(),
        )

    def _maybe_view(self) -> EngineView | None:
        interval = self.view_interval
        if interval is None:
            return None
        now = self.engine.clock()
        if now - self._last_view < interval and self.engine.has_unfinished():
            return None
        self._last_view = now
        return build_view(self.engine)

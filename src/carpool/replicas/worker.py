"""The replica process: one ``LLMEngine`` driven by a loop that talks to the front end.

Started with the ``spawn`` context (a fresh interpreter: no forked torch threads or locks)::

    inbox (Queue)  ─► SubmitRequest: add_request     (a bad request -> RequestFailed INVALID)
                      AbortRequest:  abort
                      Shutdown:      abort all, last report, exit 0
                   expire deadlines (abort -> RequestFailed TIMEOUT)
                   step()  ─► outputs
    outbox (Pipe)  ◄─ StepReport(outputs, failures, finished, LoadReport) after every iteration
                      that changed anything

The loop is the same as ``AsyncEngine``'s engine thread, with messages in place of the asyncio
queues: it never polls, it blocks on the inbox until a message, a batching timer or the nearest
deadline (and at least once a second, to notice a dead parent and exit).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import multiprocessing
import os
import queue
import signal
import sys
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import torch

from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine, StepRecord
from carpool.errors import InvalidRequestError
from carpool.outputs import RequestOutput
from carpool.replicas.messages import (
    AbortRequest,
    FailureKind,
    LoadReport,
    ReplicaCrashed,
    ReplicaReady,
    RequestFailed,
    Shutdown,
    StepReport,
    SubmitRequest,
    ToReplica,
)

logger = logging.getLogger("carpool.replica")

_PARENT_CHECK_S = 1.0  # longest blocking wait, so an orphaned replica exits within a second


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica process is started with (pickled into the new interpreter).

    Attributes:
        index: the replica's number (0-based), in logs, metrics and reports.
        engine_config: the engine to build; its ``device`` is replaced by ``device``.
        device: the torch device of this replica (``cpu``, ``cuda:1``).
        threads: torch intra-op threads (``torch.set_num_threads``); None leaves torch's default.
        log_level: the root logger level in the replica.
    """

    index: int
    engine_config: EngineConfig
    device: str = "cpu"
    threads: int | None = None
    log_level: int = logging.INFO


def replica_main(spec: ReplicaSpec, inbox: multiprocessing.Queue, outbox: Connection) -> None:
    """Entry point of the replica process: load, report ready, serve until told to stop."""
    # Ctrl-C in a terminal signals the whole process group; the front end decides when the
    # replicas stop (after draining), so the replica ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s [replica {spec.index}] %(name)s: %(message)s",
    )
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
        with contextlib.suppress(RuntimeError):  # only allowed before any parallel work
            torch.set_num_interop_threads(spec.threads)

    try:
        engine = LLMEngine(replace(spec.engine_config, device=spec.device))
    except BaseException as e:
        logger.exception("replica %d failed to load the model", spec.index)
        with contextlib.suppress(OSError):
            outbox.send(ReplicaCrashed(spec.index, f"failed to load the model: {e}"))
        sys.exit(1)
    outbox.send(
        ReplicaReady(
            replica=spec.index,
            pid=os.getpid(),
            device=spec.device,
            vocab_size=engine.model_config.vocab_size,
            max_model_len=engine.max_model_len,
            num_blocks=engine.num_blocks,
            block_size=engine.block_manager.block_size,
        )
    )
    logger.info("replica %d ready (pid %d, device %s)", spec.index, os.getpid(), spec.device)
    try:
        ReplicaLoop(engine, spec.index, inbox, outbox).run()
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the front end is gone
    except BaseException as e:
        logger.exception("replica %d engine loop failed", spec.index)
        with contextlib.suppress(OSError):
            outbox.send(ReplicaCrashed(spec.index, f"the engine failed: {e}"))
        sys.exit(1)


class _Pending:
    """What the current iteration will report."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.failed: list[RequestFailed] = []
        self.finished: list[tuple[RequestOutput, str]] = []
        self.changed = False


class ReplicaLoop:
    """The replica's serving loop (runs in the replica process's main thread).

    Args:
        engine: the loaded engine (only this loop calls it).
        index: the replica's number, put in every report.
        inbox: messages from the front end.
        outbox: reports to the front end.
    """

    def __init__(
        self, engine: LLMEngine, index: int, inbox: multiprocessing.Queue, outbox: Connection
    ) -> None:
        self.engine = engine
        self.index = index
        self.inbox = inbox
        self.outbox = outbox
        self.num_received = 0
        self._active: set[str] = set()  # ids the engine holds
        self._deadlines: list[tuple[float, str, float]] = []  # (deadline, id, timeout) heap
        self._stopping = False

    def run(self) -> None:
        """Serve until ``Shutdown`` or until the parent process is gone."""
        engine = self.engine
        stalled = False  # the last step found nothing to schedule: wait for news
        while True:
            pending = _Pending()
            busy = engine.has_unfinished() and not stalled
            timeout = 0.0 if busy else self._sleep_time()
            if self._receive(timeout, pending):
                stalled = False
            if self._stopping:
                self._abort_all(pending)
                self._send(pending, None)
                return
            if self._expire_deadlines(pending):
                stalled = False
            wake = engine.next_wake_time()
            if wake is not None and wake <= engine.clock():
                stalled = False
            record = None
            if engine.has_unfinished() and not stalled:
                steps_before = engine.stats.steps
                outputs = engine.step()
                stepped = engine.stats.steps != steps_before
                stalled = not stepped and not outputs
                record = engine.stats.records[-1] if stepped else None
                self._collect(outputs, pending)
            if pending.changed or record is not None:
                self._send(pending, record)
            elif not busy and not _parent_alive():
                return

    # ---- messages in ------------------------------------------------------------------------

    def _receive(self, timeout: float, pending: _Pending) -> bool:
        """Wait up to ``timeout`` s for a message, then take all that are queued."""
        try:
            msg: ToReplica = (
                self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
            )
        except queue.Empty:
            return False
        while True:
            self._handle(msg, pending)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, msg: ToReplica, pending: _Pending) -> None:
        pending.changed = True
        if isinstance(msg, SubmitRequest):
            self.num_received += 1
            self._add(msg, pending)
        elif isinstance(msg, AbortRequest):
            self._active.discard(msg.request_id)
            out = self.engine.abort(msg.request_id)
            if out is not None:
                pending.finished.append((out, "abort"))
        elif isinstance(msg, Shutdown):
            self._stopping = True

    def _add(self, msg: SubmitRequest, pending: _Pending) -> None:
        if self._stopping:
            pending.failed.append(
                RequestFailed(msg.request_id, FailureKind.STOPPED, "the replica is shutting down")
            )
            return
        try:
            self.engine.add_request(msg.prompt, msg.params, msg.request_id, msg.arrival_time)
        except InvalidRequestError as e:
            pending.failed.append(RequestFailed(msg.request_id, FailureKind.INVALID, str(e)))
            return
        except Exception as e:  # anything a bad input provokes: fail the request, keep serving
            logger.exception("request %s could not be added", msg.request_id)
            pending.failed.append(
                RequestFailed(msg.request_id, FailureKind.ERROR, f"{type(e).__name__}: {e}")
            )
            return
        self._active.add(msg.request_id)
        if msg.deadline is not None:
            heapq.heappush(self._deadlines, (msg.deadline, msg.request_id, msg.timeout or 0.0))

    # ---- the engine -------------------------------------------------------------------------

    def _expire_deadlines(self, pending: _Pending) -> bool:
        now = self.engine.clock()
        expired = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid, timeout = heapq.heappop(self._deadlines)
            self._active.discard(rid)
            out = self.engine.abort(rid)
            if out is None:
                continue  # finished meanwhile
            expired = pending.changed = True
            pending.finished.append((out, "timeout"))
            pending.failed.append(
                RequestFailed(
                    rid,
                    FailureKind.TIMEOUT,
                    f"request {rid} timed out: not finished within its {timeout:g} s deadline",
                    out,
                )
            )
        return expired

    def _sleep_time(self) -> float:
        """Seconds until the next batching timer or deadline, at most ``_PARENT_CHECK_S``."""
        times = [t for t in (self.engine.next_wake_time(),) if t is not None]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if not times:
            return _PARENT_CHECK_S
        return min(max(min(times) - self.engine.clock(), 0.0), _PARENT_CHECK_S)

    def _collect(self, outputs: list[RequestOutput], pending: _Pending) -> None:
        for out in outputs:
            pending.outputs.append(out)
            if out.finished:
                self._active.discard(out.request_id)
                reasons = {o.finish_reason for o in out.outputs}
                reason = next(
                    (r for r in ("error", "abort", "length", "stop") if r in reasons), "stop"
                )
                pending.finished.append((out, reason))

    def _abort_all(self, pending: _Pending) -> None:
        for rid in sorted(self._active):
            out = self.engine.abort(rid)
            if out is not None:
                pending.finished.append((out, "abort"))
                message = "the replica shut down before the request finished"
                pending.failed.append(RequestFailed(rid, FailureKind.STOPPED, message, out))
        self._active.clear()

    # ---- messages out -----------------------------------------------------------------------

    def _send(self, pending: _Pending, record: StepRecord | None) -> None:
        self.outbox.send(
            StepReport(
                replica=self.index,
                load=self._load(),
                record=record,
                outputs=pending.outputs,
                failed=pending.failed,
                finished=pending.finished,
            )
        )

    def _load(self) -> LoadReport:
        return LoadReport.from_engine(self.engine, num_received=self.num_received)


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()

"""``AsyncEngine``: an ``EngineCore`` stepped by its own thread, fed by asyncio callers.

::

    event loop (HTTP handlers)                  engine thread (the only caller of LLMEngine)
    ─────────────────────────                   ───────────────────────────────────────────
    submit() ─► core.add_request ─notify─►      EngineCore.run: inbox, deadlines, step
       ▲                                          │ CoreStep (outputs, finished, failed)
       │ RequestStream per request                ▼
       └──── loop.call_soon_threadsafe ◄──────  _deliver: each output to its request's stream

A forward pass never runs on the event loop, so the HTTP side stays responsive during a long
step. The loop itself (idle wait, deadlines, finish reasons) lives in ``EngineCore``; this file
only moves its results to asyncio.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.client import EngineClient, EngineObserver, check_queue
from carpool.engine.core import CoreStep, EngineCore, NewRequest
from carpool.engine.limits import ModelLimits
from carpool.engine.llm_engine import LLMEngine
from carpool.engine.stats import EngineSnapshot
from carpool.engine.stream import RequestStream
from carpool.engine.view import EngineTap, IterationEvent, TapSet
from carpool.errors import EngineDeadError, EngineStoppedError
from carpool.outputs import RequestOutput
from carpool.tokenizer import Tokenizer

logger = logging.getLogger("carpool.engine")
request_logger = logging.getLogger("carpool.request")


class AsyncEngine(EngineClient):
    """Runs an ``LLMEngine`` in a background thread and streams outputs to asyncio callers.

    Implements ``EngineClient``.

    Args:
        engine: the engine to drive. Only the engine thread calls it once ``start`` ran. Load
            it in a thread that has ended (``threads.run_in_own_thread``), not on a thread
            that lives on: two threads' OpenMP pools slow every step (``carpool.engine.threads``).
        max_queue: most sequences (each request counts its ``n``) that may wait beyond the
            free sequence slots (not admissible at the next step) before ``submit`` raises
            ``QueueFullError``; None = unbounded.
        request_timeout: default deadline in seconds of every request (None = none).
        observer: hooks called from the engine thread (metrics).
        log_interval: seconds between the periodic engine log lines while busy.
    """

    _id_prefix = "areq"

    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int | None = None,
        request_timeout: float | None = None,
        observer: EngineObserver | None = None,
        log_interval: float = 5.0,
    ) -> None:
        self.engine = engine
        self.core = EngineCore(engine)
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.observer = observer
        self.log_interval = log_interval
        # Written on the event loop (submit) before the core hears of the request, popped by
        # the engine thread when it ends; single dict operations are atomic.
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._snapshot = engine.snapshot()
        self._last_log = time.monotonic()
        self._last_log_tokens = 0
        self._taps = TapSet(self._set_view_interval)

    # ---- EngineClient -----------------------------------------------------------------------

    @property
    def limits(self) -> ModelLimits:
        return self.engine.limits

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def clock(self) -> float:
        return self.engine.clock()

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
        """Sequences not yet scheduled: still in the inbox or waiting in the scheduler
        (lock-free: two integer reads, never waits for the engine thread)."""
        return self.core.num_pending_adds + self._snapshot.num_waiting

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless ``num_requests`` more sequences may be queued now (lock-free).

        Raises:
            EngineDeadError: the engine failed.
            EngineStoppedError: shutting down or not started.
            QueueFullError: ``max_queue`` requests wait already.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine failed: {self._dead}")
        if not self.is_running:
            raise EngineStoppedError("the engine is not running (starting or shutting down)")
        free_slots = max(0, self.engine.config.max_num_seqs - self._snapshot.num_running)
        seats = self.engine.config.max_num_seqs
        check_queue(self.max_queue, self.num_waiting, num_requests, free_slots, seats)

    def _send(self, request: NewRequest, **route: Any) -> RequestStream:
        assert not route, f"AsyncEngine takes no routing options, got {sorted(route)}"
        stream = RequestStream(request.request_id, self.abort)
        self._streams[request.request_id] = stream
        self.core.add_request(request)
        return stream

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request (no-op when unknown or finished)."""
        self.core.abort_request(request_id)

    # ---- the live dashboard -----------------------------------------------------------------

    @property
    def engine_config(self) -> EngineConfig:
        return self.engine.config

    def describe(self) -> list[dict[str, Any]]:
        """The one in-process engine as a lane: state, pid, device and load."""
        s = self._snapshot
        state = "failed" if self._dead is not None else "ready" if self.is_running else "stopped"
        load = {
            "num_running": s.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage": round(s.kv_cache_usage, 4),
        }
        return [
            {"replica": 0, "state": state, "pid": os.getpid(),
             "device": self.engine.config.device, "load": load}
        ]  # fmt: skip

    def add_tap(self, tap: EngineTap) -> Callable[[], None]:
        """Show ``tap`` every iteration (from the engine thread); returns its remover."""
        return self._taps.add(tap)

    def _set_view_interval(self, interval: float | None) -> None:
        self.core.view_interval = interval

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent); freezes the startup heap for the collector."""
        if self._thread is not None:
            return
        # An oldest-generation collection holds the GIL while it walks every tracked object,
        # so it stalls the event loop as much as the engine thread: admitting 1,000 prompts x
        # n=128 triggered ~1 s pauses, the /v1/stats stalls of issue 15. The model, tokenizer
        # and imports (~340k objects with the default model) never become garbage: moved to
        # the permanent generation, collections stop walking them (vLLM does the same after
        # startup); the worst pause in that run fell from 0.99 s to 0.53 s.
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="carpool-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Abort whatever is still running, stop the thread and wait for it."""
        self._stopping = True
        self.core.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        # Let the collector see the startup heap again: a process that builds several
        # engines (tests, notebooks) must be able to free an old one's reference cycles.
        gc.unfreeze()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.core.run(self._deliver)
        except Exception as e:  # a bug in the engine: fail every request, keep the process up
            logger.exception("engine thread failed; every request fails from now on")
            self._dead = e
            for rid in list(self._streams):
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream.put(EngineDeadError(f"the engine failed: {e}"))
            return
        for rid in list(self._streams):  # submitted while the loop was ending
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(EngineStoppedError("the server shut down before the request finished"))

    def _deliver(self, step: CoreStep) -> None:
        """Hand one iteration's results to the streams and the observer."""
        streams = self._streams
        for out in step.outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
        for rid, error in step.failed:
            stream = streams.pop(rid, None)
            if stream is not None:
                stream.put(error)
        self._snapshot = step.snapshot
        if self.observer is not None:
            self.observer.on_step(step.record, step.snapshot, step.outputs)
        if self._taps.taps:
            self._taps.emit(IterationEvent(0, step.record, step.snapshot, step.finished, step.view))
        for out, reason in step.finished:
            streams.pop(out.request_id, None)
            if self.observer is not None:
                self.observer.on_request_finished(out, reason)
            log_finished(out, reason)
        self._maybe_log()

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


def log_finished(out: RequestOutput, reason: str) -> None:
    """One log line per finished request (``carpool.request`` logger)."""
    t = out.timings[0] if out.timings else None
    ttft = f"{t.ttft:.3f}s" if t is not None and t.ttft is not None else "-"
    e2e = f"{t.e2e:.3f}s" if t is not None and t.e2e is not None else "-"
    request_logger.info(
        "request id=%s prompt_tokens=%d generated_tokens=%d ttft=%s latency=%s finish_reason=%s",
        out.request_id,
        len(out.prompt_token_ids),
        out.num_generated_tokens,
        ttft,
        e2e,
        reason,
    )

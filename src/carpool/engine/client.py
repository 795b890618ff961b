"""``EngineClient``: the one protocol the HTTP server (and any other front end) holds.

In-process (``AsyncEngine``: a thread over one engine) and multi-process (``ReplicaPool``:
engine processes behind a router) engines both implement it, so the server imports nothing from
engine internals: it validates against ``limits``, tokenizes with ``tokenizer``, submits, reads
each request's ``RequestStream`` and aborts, and reads ``snapshot`` for stats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

from carpool.config import EngineConfig
from carpool.engine.core import NewRequest
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.stream import RequestStream
from carpool.engine.view import EngineTap
from carpool.errors import InvalidRequestError, QueueFullError
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams
from carpool.tokenizer import Tokenizer

__all__ = [
    "EngineClient",
    "EngineObserver",
    "EngineSnapshot",
    "EngineTap",
    "ModelLimits",
    "RequestStream",
    "SubmitPath",
    "check_queue",
    "generate",
]


class EngineObserver(Protocol):
    """Hooks an engine client calls (e.g. Prometheus metrics). They must be quick."""

    def on_step(
        self, record: StepRecord | None, snapshot: EngineSnapshot, outputs: Sequence[RequestOutput]
    ) -> None:
        """After each loop iteration that stepped (``record``) or changed the engine state."""

    def on_request_finished(self, output: RequestOutput, reason: str) -> None:
        """A request ended; ``reason`` is stop, length, abort, error or timeout."""


class EngineClient(Protocol):
    """What a front end may do with an engine, however it runs."""

    @property
    def limits(self) -> ModelLimits:
        """The model's limits (requests are validated against them before submission)."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (prompts and chat templates are rendered front-side)."""

    @property
    def is_running(self) -> bool:
        """True while the engine takes requests."""

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's figures after its latest iteration."""

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet scheduled (in transit included)."""

    def clock(self) -> float:
        """The engine's clock (arrival times and deadlines are on it)."""

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise (``QueueFullError``, ``EngineStoppedError``...) unless ``num_requests`` more
        requests may be queued now."""

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request now (on the event loop); returns the stream of its outputs."""

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when unknown or finished)."""

    # ---- for the live dashboard -------------------------------------------------------------

    @property
    def engine_config(self) -> EngineConfig:
        """The engine's configuration (batching policy, layout, limits in force)."""

    def describe(self) -> list[dict[str, Any]]:
        """One entry per engine (replica): index, state, pid, device, routed, load."""

    def add_tap(self, tap: EngineTap) -> Callable[[], None]:
        """Show ``tap`` every iteration (with an ``EngineView`` every ``tap.view_interval``
        seconds) until the returned function is called."""


class SubmitPath(ABC):
    """``submit`` written once for both clients: the admission check, the request id, the
    deadline, one ``NewRequest``, then the transport's ``_send`` (a thread's inbox, a replica's
    pipe). ``AsyncEngine`` and ``ReplicaPool`` inherit it.
    """

    request_timeout: float | None
    _id_prefix = "req"  # ids of requests submitted without one: ``{prefix}-{n}``
    _ids: Iterator[int]  # their numbers; the subclass sets ``itertools.count()``

    @abstractmethod
    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless ``num_requests`` more requests may be queued now."""

    @abstractmethod
    def clock(self) -> float:
        """The engine's clock."""

    @abstractmethod
    def _send(self, request: NewRequest, **route: Any) -> RequestStream:
        """Hand ``request`` to the transport; returns its stream. ``route``: the transport's
        own options (``ReplicaPool``: ``replica``)."""

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        arrival_time: float | None = None,
        **route: Any,
    ) -> RequestStream:
        """Queue a request now (call from the running event loop).

        Args:
            prompt, params, request_id, timeout, arrival_time: as for ``generate``.
            route: the transport's options (``ReplicaPool``: ``replica=i`` sends it to that
                ready replica instead of asking the router).

        Returns:
            The stream of the request's outputs; the caller must ``abort()`` it if it stops
            reading before the end.

        Raises:
            EngineStoppedError, EngineDeadError, ReplicaUnavailableError, QueueFullError: see
            ``check_capacity``.
        """
        self.check_capacity()
        if request_id is None:
            request_id = f"{self._id_prefix}-{next(self._ids)}"
        timeout = self.request_timeout if timeout is None else timeout
        request = NewRequest.at(self.clock(), request_id, prompt, params, timeout, arrival_time)
        return self._send(request, **route)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, **options: Any
    ) -> AsyncIterator[RequestOutput]:
        """``submit`` (same options), then yield the request's output each step it progresses
        (see the module-level ``generate``)."""
        return generate(self, prompt, params, **options)


def check_queue(
    max_queue: int | None,
    num_waiting: int,
    num_requests: int,
    free_slots: int = 0,
    max_slots: int | None = None,
) -> None:
    """The admission rule every client applies: at most ``max_queue`` requests that the
    engine cannot admit now.

    Args:
        max_queue: the limit (None: no limit).
        num_waiting: requests submitted and not yet scheduled.
        num_requests: requests about to be submitted.
        free_slots: sequences the engine can still schedule now (``max_num_seqs`` minus the
            running ones): that many waiting requests start at the next step, so they are not
            queued (a burst of 8 on an idle engine with 64 slots is no queue at all).
        max_slots: the most ``free_slots`` can ever be (every seat free); a request larger
            than ``max_queue`` plus that could never be admitted, so it is refused as invalid
            rather than with a 429 that no retry would clear.

    Raises:
        InvalidRequestError: ``num_requests`` alone exceed what the queue can ever take.
        QueueFullError: ``num_requests`` more would pass ``max_queue``.
    """
    if max_queue is not None and max_slots is not None and num_requests > max_queue + max_slots:
        raise InvalidRequestError(
            f"this request asks for {num_requests} sequences (prompts x n), more than this "
            f"server can ever queue ({max_queue} queued (--max-queue) + {max_slots} running)",
            param="n",
        )
    if max_queue is not None and num_waiting + num_requests - free_slots > max_queue:
        raise QueueFullError(f"too many requests are waiting (max_queue={max_queue}); retry later")


async def generate(
    client: EngineClient,
    prompt: str | list[int],
    params: SamplingParams,
    request_id: str | None = None,
    timeout: float | None = None,
    arrival_time: float | None = None,
) -> AsyncIterator[RequestOutput]:
    """Submit a request to ``client`` and yield its outputs, the last one ``finished``.

    Leaving the loop early (a disconnect cancels the task, or the consumer closes the
    generator) aborts the request, which frees its KV blocks within one engine step.

    Args:
        client: the engine.
        prompt: text or token ids.
        params: sampling parameters.
        request_id: unique id (a new one when None).
        timeout: seconds before the request is ended with ``RequestTimeoutError``
            (default: the client's ``request_timeout``).
        arrival_time: when the request arrived (the client's clock), for the queue-time
            metric.

    Raises:
        QueueFullError, EngineStoppedError, EngineDeadError: before anything is queued.
        InvalidRequestError: the engine rejected the request (nothing was generated).
        RequestTimeoutError: the deadline passed (outputs so far were yielded).
    """
    stream = client.submit(prompt, params, request_id, timeout, arrival_time)
    try:
        async for out in stream:
            yield out
    finally:  # GeneratorExit (consumer left) or CancelledError (task cancelled)
        stream.abort()

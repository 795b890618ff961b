"""The typed messages that cross the process boundary between the front end and a replica.

::

    front end (HTTP, router)                         replica process (one EngineCore)
    ────────────────────────                         ───────────────────────────────
    SubmitRequest / AbortRequest / Shutdown  ──►  inbox (multiprocessing.Queue)
                                             ◄──  outbox (a Pipe): ReplicaReady once loaded,
                                                  then a StepReport per CoreStep (outputs,
                                                  failures, finished, and the LoadReport);
                                                  a Heartbeat every interval, from its own
                                                  thread (so a long step is no silence)

Everything here is a plain picklable dataclass: no callables, no tensors, no locks; an error
travels as ``ErrorInfo`` (its class name, message, ``param`` and ``code``) and is raised again
front-side as the same exception. Times are ``time.monotonic()`` values; on Linux that clock is
system-wide, so a deadline computed by the front end means the same instant in a replica.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from carpool.engine.core import CoreStep, NewRequest
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.view import EngineView
from carpool.errors import ErrorInfo
from carpool.outputs import RequestOutput

# ---- front end -> replica -------------------------------------------------------------------

SubmitRequest = NewRequest  # start a request on the replica (the core's own request type)


@dataclass(frozen=True)
class AbortRequest:
    """Abort a request (no-op when it is unknown or finished)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Abort everything, send a last report and exit."""


@dataclass(frozen=True)
class Watch:
    """Send an ``EngineView`` at most every ``view_interval`` seconds (None: stop)."""

    view_interval: float | None


ToReplica = NewRequest | AbortRequest | Shutdown | Watch


# ---- replica -> front end -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaReady:
    """The replica loaded its model and takes requests.

    Attributes:
        replica: the replica's index.
        pid: its process id.
        device: the torch device it runs on.
        limits: what the front end validates requests against (as the replica will).
    """

    replica: int
    pid: int
    device: str
    limits: ModelLimits


@dataclass(frozen=True)
class LoadReport(EngineSnapshot):
    """A replica's load, measured by the replica itself: its engine's snapshot, plus

    Attributes:
        num_received: ``SubmitRequest`` messages received so far. The front end subtracts it
            from the number it sent to know how many requests are still in transit.
    """

    num_received: int = 0


@dataclass(frozen=True)
class RequestFailed:
    """A request ended with an error instead of a final output.

    Attributes:
        request_id: the request.
        error: the exception, as data (``error.to_exception()`` raises it front-side).
    """

    request_id: str
    error: ErrorInfo


@dataclass(frozen=True)
class StepReport:
    """One ``CoreStep`` of the replica, and its load afterwards.

    Attributes:
        replica: the replica's index.
        load: the replica's load after the iteration.
        record: the forward pass's figures, when the iteration stepped.
        outputs: per request that progressed, its output (as its ``output_kind`` asks).
        failed: requests ended with an error.
        finished: ``(final output, reason)`` of requests that ended this iteration.
        view: the engine's requests and blocks, while a ``Watch`` asks for them.
    """

    replica: int
    load: LoadReport
    record: StepRecord | None = None
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[RequestFailed] = field(default_factory=list)
    finished: list[tuple[RequestOutput, str]] = field(default_factory=list)
    view: EngineView | None = None

    @classmethod
    def of(cls, replica: int, step: CoreStep) -> StepReport:
        """The report of one core iteration."""
        return cls(
            replica=replica,
            load=LoadReport(**asdict(step.snapshot), num_received=step.num_added),
            record=step.record,
            outputs=step.outputs,
            failed=[RequestFailed(rid, e.info()) for rid, e in step.failed],
            finished=step.finished,
            view=step.view,
        )


@dataclass(frozen=True)
class ReplicaCrashed:
    """The replica's engine raised; the process exits right after sending this."""

    replica: int
    message: str


@dataclass(frozen=True)
class Heartbeat:
    """The replica process is alive: sent every ``ReplicaSpec.heartbeat_interval`` seconds
    by a thread of its own, from before the model loads until the process exits. A stopped
    or hung process sends none; the front end's watchdog acts on the silence."""

    replica: int


FromReplica = ReplicaReady | StepReport | ReplicaCrashed | Heartbeat

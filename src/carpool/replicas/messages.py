"""The typed messages that cross the process boundary between the front end and a replica.

::

    front end (HTTP, router)                         replica process (one LLMEngine)
    ────────────────────────                         ───────────────────────────────
    SubmitRequest / AbortRequest / Shutdown  ──►  inbox (multiprocessing.Queue)
                                             ◄──  outbox (a Pipe): ReplicaReady once loaded,
                                                  then StepReport after every loop iteration
                                                  that changed something (outputs, failures,
                                                  and always the replica's LoadReport)

Everything here is a plain picklable dataclass: no callables, no tensors, no locks. Times are
``time.monotonic()`` values; on Linux that clock is system-wide, so a deadline computed by the
front end means the same instant inside a replica on the same machine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from carpool.engine.async_engine import EngineSnapshot
from carpool.engine.llm_engine import StepRecord
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams

# ---- front end -> replica -------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitRequest:
    """Start a request on the replica.

    Attributes:
        request_id: unique id (the front end's).
        prompt: text or token ids.
        params: sampling parameters.
        arrival_time: when the request reached the front end (monotonic clock).
        deadline: monotonic time after which the replica aborts it (None = no deadline).
        timeout: the timeout the deadline came from (for the error message).
    """

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    deadline: float | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class AbortRequest:
    """Abort a request (no-op when it is unknown or finished)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Abort everything, send a last report and exit."""


ToReplica = SubmitRequest | AbortRequest | Shutdown


# ---- replica -> front end -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaReady:
    """The replica loaded its model and takes requests.

    Attributes:
        replica: the replica's index.
        pid: its process id.
        device: the torch device it runs on.
        vocab_size, max_model_len, num_blocks, block_size: what the front end needs to
            validate requests exactly as the replica will.
    """

    replica: int
    pid: int
    device: str
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class LoadReport(EngineSnapshot):
    """A replica's load, measured by the replica itself: its engine's snapshot, plus

    Attributes:
        num_received: ``SubmitRequest`` messages received so far. The front end subtracts it
            from the number it sent to know how many requests are still in transit.
    """

    num_received: int = 0


class FailureKind(str, enum.Enum):
    """Why a replica ended a request without a normal finish (mapped to an exception)."""

    INVALID = "invalid"  # the engine rejected the request (400)
    TIMEOUT = "timeout"  # the deadline passed (504)
    STOPPED = "stopped"  # the replica is shutting down (503)
    ERROR = "error"  # anything else (500)


@dataclass(frozen=True)
class RequestFailed:
    """A request ended with an error instead of a final output.

    Attributes:
        request_id: the request.
        kind: what went wrong.
        message: for the client.
        output: the aborted request's last state, when the engine had one (for metrics).
    """

    request_id: str
    kind: FailureKind
    message: str
    output: RequestOutput | None = None


@dataclass(frozen=True)
class StepReport:
    """What one iteration of the replica's loop produced, and its load afterwards.

    Attributes:
        replica: the replica's index.
        load: the replica's load after the iteration.
        record: the forward pass's figures, when the iteration stepped.
        outputs: per request that progressed, its state (``RequestOutput``, as ``LLMEngine``
            returns it: cumulative text and tokens plus the step's delta).
        failed: requests ended with an error.
        finished: ``(final output, reason)`` of requests that ended this iteration, reason one
            of stop, length, abort, error, timeout (for the per-request metrics).
    """

    replica: int
    load: LoadReport
    record: StepRecord | None = None
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[RequestFailed] = field(default_factory=list)
    finished: list[tuple[RequestOutput, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ReplicaCrashed:
    """The replica's engine raised; the process exits right after sending this."""

    replica: int
    message: str


FromReplica = ReplicaReady | StepReport | ReplicaCrashed

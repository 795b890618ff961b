"""One generation request and its life as an explicit state machine.

::

    WAITING ──start_running──► RUNNING ──preempt──► PREEMPTED ──start_running──► RUNNING ...
       │                          │                    │
       └──────────── finish(FINISHED_*) ◄──────────────┘   (from any unfinished state)

The scheduling policy is the only caller of the state-changing methods; the model runner reads a
request but never changes its status. The finish *reason* (what the client sees) is kept apart
from the status (what the scheduler tracks).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

from carpool.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a request stopped, as reported to the client (OpenAI's ``finish_reason``)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client went away or cancelled
    ERROR = "error"  # the engine could not serve it (see ``Request.error``)


class RequestStatus(enum.Enum):
    """Where a request is in the scheduler."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for the four ``FINISHED_*`` states."""
        return self in _STATUS_TO_REASON

    @property
    def finish_reason(self) -> FinishReason | None:
        """The client-facing reason of a finished status, None while unfinished."""
        return _STATUS_TO_REASON.get(self)

    @staticmethod
    def from_finish_reason(reason: FinishReason) -> RequestStatus:
        """The finished status that records ``reason``."""
        return _REASON_TO_STATUS[reason]


_STATUS_TO_REASON: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
_REASON_TO_STATUS: dict[FinishReason, RequestStatus] = {r: s for s, r in _STATUS_TO_REASON.items()}


@dataclass(frozen=True)
class RequestTimings:
    """Latency figures derived from a request's timestamps (seconds; None when not yet known).

    Attributes:
        queue_wait: arrival -> first scheduled.
        ttft: arrival -> first output token (time to first token).
        inter_token_gaps: time between consecutive output tokens.
        e2e: arrival -> finished (end-to-end latency).
    """

    queue_wait: float | None
    ttft: float | None
    inter_token_gaps: list[float]
    e2e: float | None

    @property
    def mean_inter_token(self) -> float | None:
        """Mean gap between output tokens (time per output token), None with < 2 tokens."""
        if not self.inter_token_gaps:
            return None
        return sum(self.inter_token_gaps) / len(self.inter_token_gaps)


class Request:
    """A prompt, its sampling parameters, its generated tokens and its scheduling state.

    Attributes:
        request_id: unique id given by the caller.
        prompt_token_ids: the prompt's token ids.
        sampling_params: how to sample and when to stop.
        eos_token_ids: end-of-sequence ids (set by the engine from the tokenizer).
        output_token_ids: tokens generated so far. Change it only via ``append_output_token``.
        num_computed_tokens: leading tokens of ``all_token_ids`` whose KV is in the cache.
        status: the scheduler state (see the module docstring).
        num_preemptions: how many times the request lost its KV and was sent back to wait.
        priority: lower is served first under the ``priority`` scheduling policy (default:
            ``sampling_params.priority``).
        num_cached_tokens: prompt tokens found in the prefix cache at first admission (their
            prefill was skipped); None before the request is first scheduled.
        error: why the engine failed the request (status FINISHED_ERROR), else None.
        arrival_time, first_scheduled_time, first_token_time, token_times, finished_time:
            timestamps on the engine's clock (``time.monotonic()`` unless the caller passes
            its own ``now``).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        eos_token_ids: Sequence[int] = (),
        priority: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        if priority is None:
            priority = self.sampling_params.priority
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        self.priority = priority
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.output_token_ids: list[int] = []
        # prompt + output, kept in step with output_token_ids so slicing it is cheap.
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.num_cached_tokens: int | None = None
        self.error: str | None = None

        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finished_time: float | None = None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )

    # ---- sizes ---------------------------------------------------------------------------

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (read-only: do not mutate the list)."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens."""
        return len(self._all_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose KV is not yet in the cache (1 for a request in decode)."""
        return self.num_tokens - self.num_computed_tokens

    # ---- state ---------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    def start_running(self, now: float, num_computed_tokens: int = 0) -> None:
        """WAITING or PREEMPTED -> RUNNING (admitted by the scheduler).

        Args:
            num_computed_tokens: leading tokens whose KV the prefix cache already holds (a
                multiple of the block size, below ``num_tokens``).
        """
        assert self.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), (
            f"cannot start request {self.request_id!r} in status {self.status.name}"
        )
        assert self.num_computed_tokens == 0, (
            f"request {self.request_id!r} admitted with {self.num_computed_tokens} computed tokens"
        )
        assert 0 <= num_computed_tokens < self.num_tokens, (
            f"request {self.request_id!r}: {num_computed_tokens} cached of {self.num_tokens}"
        )
        self.status = RequestStatus.RUNNING
        self.num_computed_tokens = num_computed_tokens
        if self.num_cached_tokens is None:
            self.num_cached_tokens = min(num_computed_tokens, self.num_prompt_tokens)
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now

    def preempt(self) -> int:
        """RUNNING -> PREEMPTED: the KV is dropped and will be recomputed.

        Returns:
            The number of computed tokens that were lost.
        """
        assert self.status is RequestStatus.RUNNING, (
            f"cannot preempt request {self.request_id!r} in status {self.status.name}"
        )
        lost = self.num_computed_tokens
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        return lost

    def finish(self, status: RequestStatus, now: float, error: str | None = None) -> None:
        """Any unfinished status -> a ``FINISHED_*`` status."""
        assert status.is_finished, f"finish() needs a FINISHED_* status, got {status.name}"
        assert not self.is_finished, (
            f"request {self.request_id!r} already finished ({self.status.name})"
        )
        self.status = status
        self.finished_time = now
        if error is not None:
            self.error = error

    def append_output_token(self, token_id: int, now: float) -> FinishReason | None:
        """Record a newly sampled token and check the token-level stop conditions.

        Stop *strings* are not checked here: they need text, so the detokenizer checks them and
        asks the scheduler to ``finish_request``.

        Returns:
            ``FinishReason.STOP`` for EOS (unless ``ignore_eos``) or a stop token id, once at
            least ``min_tokens`` tokens exist; else ``FinishReason.LENGTH`` at ``max_tokens``;
            else None. The status is not changed: the scheduler finishes the request.
        """
        assert self.status is RequestStatus.RUNNING, (
            f"token appended to request {self.request_id!r} in status {self.status.name}"
        )
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now

        params = self.sampling_params
        n = self.num_output_tokens
        if n >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
        if n >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    # ---- metrics -------------------------------------------------------------------------

    def timings(self) -> RequestTimings:
        """Queue wait, TTFT, inter-token gaps and end-to-end latency from the timestamps."""

        def since_arrival(t: float | None) -> float | None:
            return None if t is None else t - self.arrival_time

        times = self.token_times
        return RequestTimings(
            queue_wait=since_arrival(self.first_scheduled_time),
            ttft=since_arrival(self.first_token_time),
            inter_token_gaps=[b - a for a, b in zip(times[:-1], times[1:], strict=True)],
            e2e=since_arrival(self.finished_time),
        )

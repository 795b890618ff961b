"""The interface every batching strategy implements.

Sequential, static, bucketed, dynamic and continuous batching all answer one question: *which
requests run in the next forward pass, and how many tokens of each?* The engine drives any of
them with the same three calls per step::

    output = policy.schedule(now)                  # pick the chunks, reserve KV blocks
    sampled = runner.execute(output)               # {request_id: token} for needs_sample chunks
    finished = policy.update_from_output(output, sampled, now)

The runner and the model never know which policy is active.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from carpool.config import EngineConfig
from carpool.errors import InvalidRequestError
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput
from carpool.scheduling.priority import RequestOrder


def validate_new_request(
    request: Request, known: Mapping[str, Request], max_model_len: int
) -> None:
    """The checks every policy makes before queueing a request.

    Raises:
        InvalidRequestError: duplicate id, empty prompt, or prompt + max_tokens over
            ``max_model_len`` (the message gives the numbers).
    """
    rid = request.request_id
    if rid in known:
        raise InvalidRequestError(f"request id {rid!r} is already in use")
    assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0, (
        f"add_request needs a fresh request, got {request!r}"
    )
    prompt_len = request.num_prompt_tokens
    max_tokens = request.sampling_params.max_tokens
    if prompt_len == 0:
        raise InvalidRequestError(f"request {rid!r}: the prompt is empty")
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"request {rid!r}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
            f"{total} exceeds max_model_len ({max_model_len})"
        )


@dataclass
class SchedulerStats:
    """Running counters a policy keeps for metrics and tests.

    Attributes:
        steps: ``schedule`` calls that scheduled at least one chunk.
        num_scheduled_tokens: tokens scheduled over all steps.
        num_preemptions: times a running request lost its KV.
        num_preemptions_by_cause: the same, split by cause (``kv_cache``: a running request
            needed a block; ``priority``: a better-priority waiting request took the place).
        num_recomputed_tokens: tokens computed again after preemptions (counted on re-admission).
        num_finished: requests finished, whatever the reason.
    """

    steps: int = 0
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0
    num_preemptions_by_cause: dict[str, int] = field(default_factory=dict)
    num_recomputed_tokens: int = 0
    num_finished: int = 0


class SchedulingPolicy(ABC):
    """Decides, step by step, which requests run and owns their life cycle.

    A policy owns the requests it was given until they finish: it is the only component that
    changes a request's status, and it frees a request's KV blocks the moment it finishes.

    Every policy is built the same way, from the engine's own objects (one source of every
    default): the ``EngineConfig`` (each policy reads its own knobs), the ``BlockManager`` (the
    cache's size and block size) and the engine's effective context limit.

    Args:
        config: the engine's configuration.
        block_manager: the KV bookkeeping (its ``num_blocks`` is the cache's size).
        max_model_len: the engine's effective context limit (prompt + output).
    """

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        assert block_manager.block_size == config.block_size, (
            f"BlockManager block_size {block_manager.block_size} != config {config.block_size}"
        )
        assert max_model_len >= 1, f"max_model_len must be >= 1, got {max_model_len}"
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.order = RequestOrder(config.scheduling_policy, config.priority_aging_s)
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.stats = SchedulerStats()

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING).

        Raises:
            InvalidRequestError: the request can never be served by this policy (empty prompt,
                longer than the model allows, more KV than the whole cache, duplicate id). The
                policy's state is unchanged, so other requests keep being served.
        """
        validate_new_request(request, self.requests, self.max_model_len)
        # The last sampled token is never fed back, so the KV holds at most total - 1 tokens.
        total = request.num_prompt_tokens + request.sampling_params.max_tokens
        blocks = self.block_manager.blocks_needed(total - 1)
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(self._cannot_fit_message(request, blocks))
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # What a policy adds when a request can never fit (static: why it reserves so much).
    _cannot_fit_hint = ""

    def _cannot_fit_message(self, request: Request, blocks: int) -> str:
        """Why ``request``, needing up to ``blocks`` KV blocks, can never be served."""
        return (
            f"request {request.request_id!r}: prompt ({request.num_prompt_tokens} tokens) + "
            f"max_tokens ({request.sampling_params.max_tokens}) needs up to {blocks} KV blocks "
            f"of {self.block_manager.block_size} tokens, but the whole cache has "
            f"{self.block_manager.num_blocks}{self._cannot_fit_hint}"
        )

    def _output(self, chunks: list[ScheduledChunk], **fields: Any) -> SchedulerOutput:
        """This step's ``SchedulerOutput`` of ``chunks`` (counted in ``stats`` when not empty);
        ``fields``: the policy's other figures (preempted ids, idle seats)."""
        num_tokens = sum(c.num_tokens for c in chunks)
        if chunks:
            self.stats.steps += 1
            self.stats.num_scheduled_tokens += num_tokens
        return SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=num_tokens,
            kv_blocks_in_use=self.block_manager.num_used_blocks,
            **fields,
        )

    @abstractmethod
    def schedule(self, now: float) -> SchedulerOutput:
        """Pick the chunks of the next forward pass and reserve their KV blocks.

        Args:
            now: the engine clock (stamps ``first_scheduled_time``).

        Returns:
            The chunks to run; empty when there is nothing to do (or nothing fits yet).
        """

    @abstractmethod
    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int], now: float
    ) -> list[Request]:
        """Apply the result of running ``output``.

        For EVERY chunk of ``output`` (sampled or not) the request's ``num_computed_tokens``
        advances by ``len(chunk.token_ids)``. For each chunk with ``needs_sample`` the token
        ``sampled[request_id]`` is appended to the request's output (``append_output_token``);
        a request that hits a stop condition (EOS, stop token id, max_tokens) is finished and
        its blocks freed at once. Chunks of requests finished meanwhile (e.g. aborted while the
        step ran) are skipped; entries of ``sampled`` for chunks without ``needs_sample`` are
        ignored.

        Args:
            output: what ``schedule`` returned for this step.
            sampled: request_id -> the token the runner sampled (for ``needs_sample`` chunks).
            now: the engine clock (stamps token and finish times).

        Returns:
            The requests that finished in this step, in chunk order.
        """

    @abstractmethod
    def finish_request(
        self, request_id: str, reason: FinishReason, now: float, error: str | None = None
    ) -> Request | None:
        """Finish a request from outside the step (stop string, abort, error, timeout).

        Works whether the request waits, runs or is preempted; frees its blocks at once.

        Returns:
            The request if this call finished it; None if it was unknown or already finished.
        """

    def abort_request(self, request_id: str, now: float) -> Request | None:
        """Finish a request with ``FinishReason.ABORT`` (see ``finish_request``)."""
        return self.finish_request(request_id, FinishReason.ABORT, now)

    def has_unfinished(self) -> bool:
        """True while any request waits, runs or is preempted."""
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Requests queued (including preempted ones waiting for recomputation)."""
        return len(self.waiting)

    @property
    @abstractmethod
    def num_running(self) -> int:
        """Requests holding a seat in the batch."""

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def take_released(self, now: float) -> list[Request]:
        """Requests whose finish was held back and is released now, outside a step's update.

        A static batch releases all its results together, when its slowest row is done. That
        moment usually comes in ``update_from_output`` (which returns them), but it can also come
        from ``finish_request`` (a stop string ends the last running row, or an abort empties
        the batch). The engine calls this after every step, so such a release is reported at
        once. Policies that never hold a finished request keep the default.

        Returns:
            The requests finished by this release (each exactly once), in seat order.
        """
        return []

    def wake_time(self) -> float | None:
        """When ``schedule`` may next have work *without* a new arrival (a batching timer).

        Returns:
            An engine-clock time, or None when only a new request (or a finished step) can
            change what ``schedule`` returns. The engine's loop sleeps until then instead of
            polling. Policies without timers keep the default (None).
        """
        return None

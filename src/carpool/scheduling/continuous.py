"""Continuous (iteration-level) batching with chunked prefill and preemption by recomputation.

Each step:

1. RUNNING requests first, in admission order with decodes ahead of prompt chunks, so a long
   prompt never starves the requests that are generating: a decode costs 1 token of the
   budget, a request still mid-prompt gets its next chunk (as much as the budget has left).
2. Then WAITING requests, first come first served (preempted ones wait at the front), while
   seats (``max_num_seqs``), budget (``max_num_batched_tokens``) and KV blocks last. A prompt
   longer than the remaining budget is admitted with a chunk of what remains. No request is
   admitted in a step that had to preempt (it would only be preempted again).

When a running request cannot get a block for its next tokens, the running request that is
cheapest to recompute (fewest computed tokens; ties to the most recently admitted) is preempted:
its blocks are freed, ``num_computed_tokens`` resets to 0 and it waits at the front of the
queue. On re-admission it is prefilled again over prompt + the tokens it already generated, so
its next sampled token continues where it stopped. A finished request frees its blocks at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from carpool.errors import InvalidRequestError
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.scheduling.base import SchedulerStats, SchedulingPolicy, validate_new_request
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of the continuous scheduler.

    Attributes:
        max_num_seqs: most requests in one forward pass (seats).
        max_num_batched_tokens: most tokens in one forward pass (prefill chunks + decodes).
        block_size: token slots per KV block (must match the BlockManager).
        num_blocks: KV blocks in the whole cache (from ``num_blocks_for_budget``).
        max_model_len: longest prompt + output a request may ask for.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int
    max_model_len: int

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "num_blocks",
            "max_model_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")


class ContinuousScheduler(SchedulingPolicy):
    """Iteration-level scheduler over a paged KV cache (see the module docstring).

    Args:
        config: the limits.
        block_manager: the KV bookkeeping to use; a fresh one sized from ``config`` if None.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager | None = None) -> None:
        if block_manager is None:
            block_manager = BlockManager(config.num_blocks, config.block_size)
        assert block_manager.block_size == config.block_size, (
            f"BlockManager block_size {block_manager.block_size} != config {config.block_size}"
        )
        assert block_manager.num_blocks == config.num_blocks, (
            f"BlockManager num_blocks {block_manager.num_blocks} != config {config.num_blocks}"
        )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.stats = SchedulerStats()
        # request_id -> computed tokens lost to preemption, counted as recomputed on re-admission
        self._lost_tokens: dict[str, int] = {}

    # ---- queue ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        validate_new_request(request, self.requests, self.config.max_model_len)
        rid = request.request_id
        prompt_len = request.num_prompt_tokens
        max_tokens = request.sampling_params.max_tokens
        total = prompt_len + max_tokens
        # The last sampled token is never fed back, so the KV holds at most total - 1 tokens.
        blocks = self.block_manager.blocks_needed(total - 1)
        if blocks > self.config.num_blocks:
            raise InvalidRequestError(
                f"request {rid!r}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) "
                f"needs up to {blocks} KV blocks of {self.config.block_size} tokens, but the "
                f"whole cache has {self.config.num_blocks}"
            )
        self.requests[rid] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_batched_tokens
        scheduled: dict[str, ScheduledChunk] = {}  # insertion order = chunk order
        preempted: list[str] = []

        # 1. Running requests: decodes (1 uncomputed token) first, then prompt chunks.
        for req in sorted(self.running, key=lambda r: r.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            rid = req.request_id
            num_new = min(req.num_uncomputed_tokens, budget)
            end = req.num_computed_tokens + num_new
            while not bm.can_allocate(rid, end):
                victim = self._cheapest_running()
                budget += self._preempt(victim, scheduled)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            bm.allocate(rid, end)
            scheduled[rid] = self._make_chunk(req, num_new)
            budget -= num_new

        # 2. Waiting requests, FCFS; head-of-line blocking keeps the order fair.
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                rid = req.request_id
                num_new = min(req.num_tokens, budget)
                if not bm.can_allocate(rid, num_new):
                    break
                self.waiting.popleft()
                req.start_running(now)
                self.running.append(req)
                self.stats.num_recomputed_tokens += self._lost_tokens.pop(rid, 0)
                bm.allocate(rid, num_new)
                scheduled[rid] = self._make_chunk(req, num_new)
                budget -= num_new

        chunks = list(scheduled.values())
        num_tokens = sum(c.num_tokens for c in chunks)
        assert num_tokens <= cfg.max_num_batched_tokens, (num_tokens, cfg.max_num_batched_tokens)
        assert len(chunks) <= cfg.max_num_seqs, (len(chunks), cfg.max_num_seqs)
        if chunks:
            self.stats.steps += 1
            self.stats.num_scheduled_tokens += num_tokens
        return SchedulerOutput(
            chunks=chunks,
            preempted_ids=preempted,
            num_batched_tokens=num_tokens,
            kv_blocks_in_use=bm.num_used_blocks,
        )

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int], now: float
    ) -> list[Request]:
        finished: list[Request] = []
        for chunk in output.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None:
                continue  # finished (e.g. aborted) while the step ran
            assert req.status is RequestStatus.RUNNING, f"chunk for non-running {req!r}"
            assert req.num_computed_tokens == chunk.start_pos, (
                f"chunk of {chunk.request_id!r} starts at {chunk.start_pos}, "
                f"but {req.num_computed_tokens} tokens are computed"
            )
            req.num_computed_tokens = chunk.end_pos
            if not chunk.needs_sample:
                continue
            assert chunk.request_id in sampled, (
                f"no sampled token for {chunk.request_id!r}, whose chunk needs_sample"
            )
            reason = req.append_output_token(sampled[chunk.request_id], now)
            if reason is not None:
                self._finish(req, RequestStatus.from_finish_reason(reason), now)
                finished.append(req)
        return finished

    def finish_request(
        self, request_id: str, reason: FinishReason, now: float, error: str | None = None
    ) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, RequestStatus.from_finish_reason(reason), now, error)
        return req

    # ---- helpers -------------------------------------------------------------------------

    def _make_chunk(self, req: Request, num_new: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start:end],
            start_pos=start,
            block_table=self.block_manager.get_block_table(req.request_id),
            needs_sample=end == req.num_tokens,
        )

    def _cheapest_running(self) -> Request:
        """The running request that is cheapest to recompute (ties: most recently admitted)."""
        running = self.running
        assert running, "preemption needed but nothing is running"
        i = min(range(len(running)), key=lambda i: (running[i].num_computed_tokens, -i))
        return running[i]

    def _preempt(self, victim: Request, scheduled: dict[str, ScheduledChunk]) -> int:
        """Preempt ``victim``; returns the budget its already-scheduled chunk gave back."""
        chunk = scheduled.pop(victim.request_id, None)
        self.running.remove(victim)
        self.block_manager.free(victim.request_id)
        self._lost_tokens[victim.request_id] = victim.preempt()
        self.waiting.appendleft(victim)
        self.stats.num_preemptions += 1
        return chunk.num_tokens if chunk is not None else 0

    def _finish(
        self, req: Request, status: RequestStatus, now: float, error: str | None = None
    ) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req.request_id)
        self._lost_tokens.pop(req.request_id, None)
        del self.requests[req.request_id]
        req.finish(status, now, error)
        self.stats.num_finished += 1

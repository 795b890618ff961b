"""Continuous (iteration-level) batching with chunked prefill, preemption by recomputation,
automatic prefix caching and an optional priority order.

Each step:

1. RUNNING requests first, in admission order with decodes ahead of prompt chunks, so a long
   prompt never starves the requests that are generating: a decode costs 1 token of the
   budget, a request still mid-prompt gets its next chunk (as much as the budget has left).
2. Then WAITING requests, first come first served (preempted ones wait at the front) or, under
   the ``priority`` policy, by (effective priority, arrival) (``carpool.scheduling.priority``),
   while seats (``max_num_seqs``), budget (``max_num_batched_tokens``) and KV blocks last. A
   prompt longer than the remaining budget is admitted with a chunk of what remains. No request
   is admitted in a step that had to preempt for KV (it would only be preempted again).

Prefix caching (when the BlockManager has it on): an admitted request starts with the longest
run of cached full blocks of its tokens as already computed (the last token is always computed)
and its chunk starts after them. Blocks are offered to the cache after the step that computed
them. A waiting request whose next block is being computed in this very step by another request
(an ``n > 1`` sibling, or a burst of requests behind one system prompt) waits one step and then
shares that block instead of computing a private copy.

When a running request cannot get a block for its next tokens, a running request is preempted
(cause ``kv_cache``): under ``fcfs`` the one cheapest to recompute (fewest computed tokens; ties
to the most recently admitted), under ``priority`` the worst-priority one (latest arrival among
equals). Under ``priority``, a waiting request that finds the seats or the blocks full also
preempts running requests of strictly worse effective priority, worst first (cause
``priority``). A preempted request's blocks are freed, ``num_computed_tokens`` resets to 0 and
it waits again; on re-admission it is prefilled again over prompt + the tokens it already
generated (reusing whatever of that is still cached), so its next sampled token continues where
it stopped. A finished request frees its blocks at once.
"""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput
from carpool.scheduling.priority import PREEMPT_KV_CACHE, PREEMPT_PRIORITY


class ContinuousScheduler(SchedulingPolicy):
    """Iteration-level scheduler over a paged KV cache (see the module docstring).

    Reads ``max_num_seqs``, ``max_num_batched_tokens``, ``scheduling_policy`` and
    ``priority_aging_s`` of the ``EngineConfig`` (constructor: see ``SchedulingPolicy``).
    """

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        super().__init__(config, block_manager, max_model_len)
        self.running: list[Request] = []  # admission order
        # request_id -> computed tokens lost to preemption, counted as recomputed on re-admission
        self._lost_tokens: dict[str, int] = {}

    @property
    def num_running(self) -> int:
        return len(self.running)

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
                victim = self._kv_victim(now)
                budget += self._preempt(victim, scheduled, PREEMPT_KV_CACHE)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            new_blocks = bm.allocate(rid, end)
            kept = bm.num_table_blocks(rid) - len(new_blocks)
            scheduled[rid] = self._make_chunk(req, num_new, new_blocks, kept)
            budget -= num_new

        # 2. Waiting requests, in order; head-of-line blocking keeps the order fair.
        if not preempted:
            budget = self._admit(now, budget, scheduled, preempted)

        out = self._output(list(scheduled.values()), preempted_ids=preempted)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens, (
            out.num_batched_tokens,
            cfg.max_num_batched_tokens,
        )
        assert out.num_seqs <= cfg.max_num_seqs, (out.num_seqs, cfg.max_num_seqs)
        return out

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
            # The step wrote these tokens' KV: their full blocks may now be shared.
            self.block_manager.cache_blocks(req.request_id, req.all_token_ids, chunk.end_pos)
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

    def _make_chunk(
        self, req: Request, num_new: int, new_blocks: list[int], num_kept: int
    ) -> ScheduledChunk:
        """The next ``num_new`` tokens of ``req``; the table gained ``new_blocks`` after its
        first ``num_kept`` blocks (0: an admission hands the whole table over)."""
        start = req.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start:end],
            start_pos=start,
            new_block_ids=new_blocks,
            num_kept_blocks=num_kept,
            needs_sample=end == req.num_tokens,
        )

    def _admit(
        self,
        now: float,
        budget: int,
        scheduled: dict[str, ScheduledChunk],
        preempted: list[str],
    ) -> int:
        """Admit waiting requests in order while seats, budget and blocks last; returns the
        budget left. Under ``priority`` a request may preempt worse-priority running ones."""
        cfg, bm, order = self.config, self.block_manager, self.order
        if not self.waiting:
            return budget
        bs = bm.block_size
        inflight = self._inflight_hashes(scheduled)
        for req in order.sorted(self.waiting, now):
            if budget == 0:
                break
            rid = req.request_id
            hit = bm.find_cached_prefix(rid, req.all_token_ids)
            if inflight and self._next_block_inflight(req, len(hit), inflight):
                continue  # share it after this step instead of computing a copy now
            num_cached = len(hit) * bs
            num_new = min(req.num_tokens - num_cached, budget)
            end = num_cached + num_new
            while len(self.running) >= cfg.max_num_seqs or not bm.can_allocate(rid, end, hit):
                if not self.running:
                    break
                victim = order.worst(self.running, now)
                if not order.outranks(req, victim, now):
                    break
                budget += self._preempt(victim, scheduled, PREEMPT_PRIORITY)
                preempted.append(victim.request_id)
            if len(self.running) >= cfg.max_num_seqs or not bm.can_allocate(rid, end, hit):
                break
            self.waiting.remove(req)
            req.start_running(now, num_cached)
            self.running.append(req)
            lost = self._lost_tokens.pop(rid, 0)
            self.stats.num_recomputed_tokens += max(0, lost - num_cached)
            if bm.enable_caching:
                bm.record_lookup(req.num_tokens, num_cached)
            new_blocks = bm.allocate(rid, end, hit)
            scheduled[rid] = self._make_chunk(req, num_new, hit + new_blocks, 0)
            budget -= num_new
            if bm.enable_caching:
                inflight.update(self._completed_hashes(scheduled[rid]))
        return budget

    def _completed_hashes(self, chunk: ScheduledChunk) -> list[bytes]:
        """Hashes of the blocks that ``chunk`` fills up (they are cached after the step)."""
        req = self.requests[chunk.request_id]
        bs = self.block_manager.block_size
        hashes = self.block_manager.block_hashes(req.request_id, req.all_token_ids)
        return hashes[chunk.start_pos // bs : chunk.end_pos // bs]

    def _inflight_hashes(self, scheduled: dict[str, ScheduledChunk]) -> set[bytes]:
        if not self.block_manager.enable_caching:
            return set()
        return {h for c in scheduled.values() for h in self._completed_hashes(c)}

    def _next_block_inflight(self, req: Request, num_hit: int, inflight: set[bytes]) -> bool:
        """Whether the first block ``req`` would compute is being computed this step."""
        bm = self.block_manager
        if num_hit >= (req.num_tokens - 1) // bm.block_size:
            return False  # the rest is the request's own last, partial or sampled block
        return bm.block_hashes(req.request_id, req.all_token_ids)[num_hit] in inflight

    def _kv_victim(self, now: float) -> Request:
        """Whom to preempt when a running request needs a block (see the module docstring)."""
        running = self.running
        assert running, "preemption needed but nothing is running"
        if self.order.by_priority:
            return self.order.worst(running, now)
        i = min(range(len(running)), key=lambda i: (running[i].num_computed_tokens, -i))
        return running[i]

    def _preempt(self, victim: Request, scheduled: dict[str, ScheduledChunk], cause: str) -> int:
        """Preempt ``victim``; returns the budget its already-scheduled chunk gave back."""
        chunk = scheduled.pop(victim.request_id, None)
        self.running.remove(victim)
        self.block_manager.free(victim.request_id)
        self._lost_tokens[victim.request_id] = victim.preempt()
        self.waiting.appendleft(victim)
        self.stats.num_preemptions += 1
        by_cause = self.stats.num_preemptions_by_cause
        by_cause[cause] = by_cause.get(cause, 0) + 1
        return chunk.num_tokens if chunk is not None else 0

    def _finish(
        self, req: Request, status: RequestStatus, now: float, error: str | None = None
    ) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        # A failed request's KV may be wrong: keep none of it cached.
        self.block_manager.free(req.request_id, discard=status is RequestStatus.FINISHED_ERROR)
        self._lost_tokens.pop(req.request_id, None)
        del self.requests[req.request_id]
        req.finish(status, now, error)
        self.stats.num_finished += 1

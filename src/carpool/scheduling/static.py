"""Static batching: B requests run together until the slowest is done, then all are released.

The classic batch of a ``model.generate(batch)`` call, as a policy of the paged engine:

1. When no batch runs, pick up to ``batch_size`` waiting requests (first come, first served, or
   by (effective priority, arrival) under the ``priority`` policy; subclasses choose
   differently: ``bucketed`` by prompt length, ``dynamic`` on a timer) and
   reserve each one's *whole* KV up front (prompt + max_tokens), stopping at the first request
   whose reservation does not fit. No request of a running batch ever needs another block, so
   static batches never preempt; a request bigger than the whole cache is rejected when added.
2. Every step runs each row that is not done: the whole prompt in the first step (no chunked
   prefill), then one decode token.
3. A row that stops (EOS, stop token, max_tokens or a stop string) keeps its seat: its blocks
   are freed at once, but the request stays RUNNING and unreported. With the padded layout its
   seat keeps computing a pad row every step (``SchedulerOutput.num_idle_seats``), which is the
   waste the benchmark shows.
4. When the last row is done the whole batch is *released*: every held request is finished at
   that moment (so its end-to-end latency is the batch's) and returned together, from
   ``update_from_output`` or, when a stop string or an abort completed the batch, from
   ``take_released``.

Priority only orders the *next* batch: a running static batch is never preempted, so a
better-priority arrival waits for the running batch to end.

Prefix caching: the static family does not use it. Every launched request reserves its whole KV
and prefills its whole prompt in the first step (a padded static batch computes the full
rectangle anyway); it never looks up or offers cached blocks, so it takes only blocks that are
free (or evictable, which it never creates).

Aborts and errors are not held: the client is gone (or must hear at once), so the request is
finished immediately and its seat stays idle until the batch ends.
"""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput

# Finish reasons a static batch holds back until the batch ends (the others finish at once).
_HELD_REASONS = (FinishReason.STOP, FinishReason.LENGTH)


class StaticBatchPolicy(SchedulingPolicy):
    """Runs one batch at a time to completion (see the module docstring).

    Subclasses change only *which* waiting requests form the next batch, by overriding
    ``_candidates``.

    Reads ``batch_size``, ``scheduling_policy`` and ``priority_aging_s`` of the
    ``EngineConfig`` (constructor: see ``SchedulingPolicy``); subclasses read their own knobs.
    """

    name = "static"
    _cannot_fit_hint = (
        "; static batching reserves prompt + max_tokens of KV up front: lower max_tokens or "
        "give the KV cache more memory"
    )

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        super().__init__(config, block_manager, max_model_len)
        self.batch_size = config.batch_size  # most requests in one batch (seats)
        self.batch: list[Request] = []  # the seats of the running batch, in launch order
        self.num_batches = 0
        self._held: dict[str, RequestStatus] = {}  # done rows of the batch -> their final status
        self._released: list[Request] = []  # released outside update_from_output

    @property
    def num_running(self) -> int:
        """Unfinished requests seated in the running batch (held rows included)."""
        return sum(1 for r in self.batch if not r.is_finished)

    # ---- batch formation (the part subclasses change) --------------------------------------

    def _candidates(self, now: float) -> list[Request]:
        """Waiting requests that may form the next batch, in priority order ([] = not yet).

        The launch takes them in this order while their KV reservations fit. The default is
        first come, first served (or by priority under the ``priority`` policy).
        """
        return self.order.sorted(self.waiting, now)[: self.batch_size]

    def _blocks_reserved(self, req: Request) -> int:
        # The last sampled token is never fed back, so the KV holds at most total - 1 tokens.
        total = req.num_prompt_tokens + req.sampling_params.max_tokens
        return self.block_manager.blocks_needed(total - 1)

    def _launch(self, now: float) -> None:
        """Start the next batch if there are candidates; reserve all their KV up front."""
        assert not self.batch and not self._held, "a batch is still running"
        bm = self.block_manager
        free = bm.num_free_blocks
        for req in self._candidates(now)[: self.batch_size]:
            need = self._blocks_reserved(req)
            if need > free:
                break  # keep the order: the rest waits for the next batch
            free -= need
            self.waiting.remove(req)
            total = req.num_prompt_tokens + req.sampling_params.max_tokens
            bm.allocate(req.request_id, total - 1)
            req.start_running(now)
            self.batch.append(req)
        if self.batch:
            self.num_batches += 1

    # ---- one step ------------------------------------------------------------------------

    def _is_active(self, req: Request) -> bool:
        return not req.is_finished and req.request_id not in self._held

    def schedule(self, now: float) -> SchedulerOutput:
        if not self.batch and self.waiting:
            self._launch(now)
        chunks = []
        for req in self.batch:
            if not self._is_active(req):
                continue
            start = req.num_computed_tokens
            # The whole KV was reserved at launch: the first step hands the table over, later
            # steps keep it.
            if start == 0:
                new_blocks, kept = self.block_manager.get_block_table(req.request_id), 0
            else:
                new_blocks, kept = [], self.block_manager.num_table_blocks(req.request_id)
            chunks.append(
                ScheduledChunk(
                    request_id=req.request_id,
                    token_ids=req.all_token_ids[start:],
                    start_pos=start,
                    new_block_ids=new_blocks,
                    num_kept_blocks=kept,
                    needs_sample=True,
                )
            )
        return self._output(chunks, num_idle_seats=len(self.batch) - len(chunks) if chunks else 0)

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int], now: float
    ) -> list[Request]:
        for chunk in output.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or not self._is_active(req):
                continue  # finished or done while the step ran (abort, stop string)
            assert req.num_computed_tokens == chunk.start_pos, (
                f"chunk of {chunk.request_id!r} starts at {chunk.start_pos}, "
                f"but {req.num_computed_tokens} tokens are computed"
            )
            req.num_computed_tokens = chunk.end_pos
            assert chunk.request_id in sampled, f"no sampled token for {chunk.request_id!r}"
            reason = req.append_output_token(sampled[chunk.request_id], now)
            if reason is not None:
                self._hold(req, RequestStatus.from_finish_reason(reason))
        return self._release_if_done(now)

    def finish_request(
        self, request_id: str, reason: FinishReason, now: float, error: str | None = None
    ) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        status = RequestStatus.from_finish_reason(reason)
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif reason in _HELD_REASONS:
            if request_id not in self._held:  # a held row keeps its first reason
                self._hold(req, status)
                self._released.extend(self._release_if_done(now))
            return req if req.is_finished else None
        else:  # abort or error: report now; the seat stays idle until the batch ends
            self._held.pop(request_id, None)
            self.block_manager.free(request_id)
        self._finish(req, status, now, error)
        self._released.extend(self._release_if_done(now))
        return req

    def take_released(self, now: float) -> list[Request]:
        released, self._released = self._released, []
        return released

    # ---- helpers -------------------------------------------------------------------------

    def _hold(self, req: Request, status: RequestStatus) -> None:
        """A row is done: free its KV now, report it when the batch ends."""
        self.block_manager.free(req.request_id)
        self._held[req.request_id] = status

    def _release_if_done(self, now: float) -> list[Request]:
        """Finish and return every held row once no row of the batch is still running."""
        if not self.batch or any(self._is_active(r) for r in self.batch):
            return []
        released = []
        for req in self.batch:
            status = self._held.pop(req.request_id, None)
            if status is not None:
                self._finish(req, status, now)
                released.append(req)
        assert not self._held, f"held rows outside the batch: {sorted(self._held)}"
        self.batch = []
        return released

    def _finish(
        self, req: Request, status: RequestStatus, now: float, error: str | None = None
    ) -> None:
        del self.requests[req.request_id]
        req.finish(status, now, error)
        self.stats.num_finished += 1

"""Dynamic batching: a queue that launches a batch when it is full or its oldest request waited.

A batch launches when ``batch_size`` requests wait, or when the oldest waiting request has
waited ``max_wait_ms`` (then with whatever waits, up to ``batch_size``). The launched batch runs
statically (``StaticBatchPolicy``): rows hold their seats and results are released together.
Under the ``priority`` policy the launched batch takes the best-priority waiting requests (the
timer still runs from the oldest arrival); a running batch is never preempted.

There is no polling: while requests wait for the timer, ``wake_time`` returns the deadline and
the engine's loop sleeps until then (or until a new request arrives), on the engine's clock.
"""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import Request
from carpool.scheduling.static import StaticBatchPolicy


class DynamicBatchPolicy(StaticBatchPolicy):
    """Launches a static batch when full or when the oldest request's timer expires.

    Args:
        config: as for ``StaticBatchPolicy`` (``batch_size`` is the largest batch launched),
            plus ``max_wait_ms``: launch a partial batch once its oldest request waited this
            long.
        block_manager: the KV bookkeeping.
        max_model_len: the engine's effective context limit.
    """

    name = "dynamic"

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        super().__init__(config, block_manager, max_model_len)
        self.max_wait_s = config.max_wait_ms / 1000

    def _deadline(self) -> float:
        """When the oldest waiting request's timer expires (engine clock)."""
        return self.waiting[0].arrival_time + self.max_wait_s

    def _candidates(self, now: float) -> list[Request]:
        if not self.waiting:
            return []
        if len(self.waiting) < self.batch_size and now < self._deadline():
            return []  # neither full nor timed out: keep collecting
        return self.order.sorted(self.waiting, now)[: self.batch_size]

    def wake_time(self) -> float | None:
        """The oldest waiting request's deadline while no batch runs; else None.

        While a batch runs, steps keep the loop busy and the next launch follows its release.
        """
        if self.batch or not self.waiting:
            return None
        return self._deadline()

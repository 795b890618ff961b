"""Dynamic batching: a queue that launches a batch when it is full or its oldest request waited.

A batch launches when ``batch_size`` requests wait, or when the oldest waiting request has
waited ``max_wait_s`` (then with whatever waits, up to ``batch_size``). The launched batch runs
statically (``StaticBatchPolicy``): rows hold their seats and results are released together.
Under the ``priority`` policy the launched batch takes the best-priority waiting requests (the
timer still runs from the oldest arrival); a running batch is never preempted.

There is no polling: while requests wait for the timer, ``wake_time`` returns the deadline and
the engine's loop sleeps until then (or until a new request arrives), on the engine's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.kv_cache.block_manager import BlockManager
from carpool.request import Request
from carpool.scheduling.static import StaticBatchPolicy, StaticConfig


@dataclass(frozen=True, kw_only=True)
class DynamicConfig(StaticConfig):
    """``StaticConfig`` plus the launch timer; ``batch_size`` is the largest batch launched.

    Attributes:
        max_wait_s: launch a partial batch once its oldest request waited this long (seconds).
    """

    max_wait_s: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_wait_s >= 0:
            raise ValueError(f"DynamicConfig.max_wait_s must be >= 0, got {self.max_wait_s!r}")


class DynamicBatchPolicy(StaticBatchPolicy):
    """Launches a static batch when full or when the oldest request's timer expires.

    Args:
        config: the limits and the timer.
        block_manager: the KV bookkeeping to use; a fresh one sized from ``config`` if None.
    """

    name = "dynamic"
    config: DynamicConfig

    def __init__(self, config: DynamicConfig, block_manager: BlockManager | None = None) -> None:
        super().__init__(config, block_manager)

    def _deadline(self) -> float:
        """When the oldest waiting request's timer expires (engine clock)."""
        return self.waiting[0].arrival_time + self.config.max_wait_s

    def _candidates(self, now: float) -> list[Request]:
        if not self.waiting:
            return []
        if len(self.waiting) < self.config.batch_size and now < self._deadline():
            return []  # neither full nor timed out: keep collecting
        return self.config.order.sorted(self.waiting, now)[: self.config.batch_size]

    def wake_time(self) -> float | None:
        """The oldest waiting request's deadline while no batch runs; else None.

        While a batch runs, steps keep the loop busy and the next launch follows its release.
        """
        if self.batch or not self.waiting:
            return None
        return self._deadline()

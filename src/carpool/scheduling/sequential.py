"""Sequential batching: one request from start to finish, then the next (the baseline)."""

from __future__ import annotations

from dataclasses import replace

from carpool.kv_cache.block_manager import BlockManager
from carpool.scheduling.static import StaticBatchPolicy, StaticConfig


class SequentialPolicy(StaticBatchPolicy):
    """A static batch of one: requests run alone, first come, first served.

    Args:
        config: the limits; ``batch_size`` is forced to 1.
        block_manager: the KV bookkeeping to use; a fresh one sized from ``config`` if None.
    """

    name = "sequential"

    def __init__(self, config: StaticConfig, block_manager: BlockManager | None = None) -> None:
        super().__init__(replace(config, batch_size=1), block_manager)

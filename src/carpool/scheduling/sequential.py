"""Sequential batching: one request from start to finish, then the next (the baseline)."""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.scheduling.static import StaticBatchPolicy


class SequentialPolicy(StaticBatchPolicy):
    """A static batch of one: requests run alone, first come, first served.

    Args:
        config: as for ``StaticBatchPolicy``; its ``batch_size`` is ignored (always 1).
        block_manager: the KV bookkeeping.
        max_model_len: the engine's effective context limit.
    """

    name = "sequential"

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        super().__init__(config, block_manager, max_model_len)
        self.batch_size = 1

"""Build the scheduling policy an ``EngineConfig`` names."""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.bucketed import BucketedPolicy
from carpool.scheduling.continuous import ContinuousScheduler
from carpool.scheduling.dynamic import DynamicBatchPolicy
from carpool.scheduling.sequential import SequentialPolicy
from carpool.scheduling.static import StaticBatchPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    "sequential": SequentialPolicy,
    "static": StaticBatchPolicy,
    "bucketed": BucketedPolicy,
    "dynamic": DynamicBatchPolicy,
    "continuous": ContinuousScheduler,
}


def make_policy(
    config: EngineConfig, block_manager: BlockManager, max_model_len: int
) -> SchedulingPolicy:
    """The policy of ``config.batching`` over ``block_manager``.

    Args:
        config: the engine's configuration (``batching`` and that strategy's knobs).
        block_manager: the engine's KV bookkeeping (its size fixes ``num_blocks``).
        max_model_len: the engine's effective context limit.
    """
    policy = POLICIES.get(config.batching)
    if policy is None:
        raise ValueError(f"unknown batching strategy {config.batching!r}")
    return policy(config, block_manager, max_model_len)

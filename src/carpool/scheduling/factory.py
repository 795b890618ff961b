"""Build the scheduling policy an ``EngineConfig`` names."""

from __future__ import annotations

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.bucketed import BucketedConfig, BucketedPolicy
from carpool.scheduling.continuous import ContinuousScheduler, SchedulerConfig
from carpool.scheduling.dynamic import DynamicBatchPolicy, DynamicConfig
from carpool.scheduling.priority import RequestOrder
from carpool.scheduling.sequential import SequentialPolicy
from carpool.scheduling.static import StaticBatchPolicy, StaticConfig


def make_policy(
    config: EngineConfig, block_manager: BlockManager, max_model_len: int
) -> SchedulingPolicy:
    """The policy of ``config.batching`` over ``block_manager``.

    Args:
        config: the engine's configuration (``batching`` and that strategy's knobs).
        block_manager: the engine's KV bookkeeping (its size fixes ``num_blocks``).
        max_model_len: the engine's effective context limit.
    """
    common = dict(
        order=RequestOrder(config.scheduling_policy, config.priority_aging_s),
        block_size=config.block_size,
        num_blocks=block_manager.num_blocks,
        max_model_len=max_model_len,
    )
    kind = config.batching
    if kind == "continuous":
        sched = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            **common,
        )
        return ContinuousScheduler(sched, block_manager)
    if kind == "sequential":
        return SequentialPolicy(StaticConfig(batch_size=1, **common), block_manager)
    if kind == "static":
        return StaticBatchPolicy(
            StaticConfig(batch_size=config.batch_size, **common), block_manager
        )
    if kind == "bucketed":
        if config.bucket_boundaries is not None:
            bucketed = BucketedConfig(
                batch_size=config.batch_size, bucket_boundaries=config.bucket_boundaries, **common
            )
        else:
            bucketed = BucketedConfig.with_num_buckets(
                config.num_buckets, batch_size=config.batch_size, **common
            )
        return BucketedPolicy(bucketed, block_manager)
    if kind == "dynamic":
        dynamic = DynamicConfig(
            batch_size=config.batch_size, max_wait_s=config.max_wait_ms / 1000, **common
        )
        return DynamicBatchPolicy(dynamic, block_manager)
    raise ValueError(f"unknown batching strategy {kind!r}")

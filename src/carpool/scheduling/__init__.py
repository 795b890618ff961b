"""Batching strategies: each decides which requests run in the next forward pass."""

from __future__ import annotations

from carpool.scheduling.base import SchedulerStats, SchedulingPolicy
from carpool.scheduling.bucketed import BucketedConfig, BucketedPolicy
from carpool.scheduling.continuous import ContinuousScheduler, SchedulerConfig
from carpool.scheduling.dynamic import DynamicBatchPolicy, DynamicConfig
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput
from carpool.scheduling.sequential import SequentialPolicy
from carpool.scheduling.static import StaticBatchPolicy, StaticConfig

__all__ = [
    "BucketedConfig",
    "BucketedPolicy",
    "ContinuousScheduler",
    "DynamicBatchPolicy",
    "DynamicConfig",
    "ScheduledChunk",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "SchedulingPolicy",
    "SequentialPolicy",
    "StaticBatchPolicy",
    "StaticConfig",
]

"""Batching strategies: each decides which requests run in the next forward pass."""

from __future__ import annotations

from carpool.scheduling.base import SchedulerStats, SchedulingPolicy
from carpool.scheduling.bucketed import BucketedPolicy
from carpool.scheduling.continuous import ContinuousScheduler
from carpool.scheduling.dynamic import DynamicBatchPolicy
from carpool.scheduling.output import BlockTables, ScheduledChunk, SchedulerOutput
from carpool.scheduling.sequential import SequentialPolicy
from carpool.scheduling.static import StaticBatchPolicy

__all__ = [
    "BlockTables",
    "BucketedPolicy",
    "ContinuousScheduler",
    "DynamicBatchPolicy",
    "ScheduledChunk",
    "SchedulerOutput",
    "SchedulerStats",
    "SchedulingPolicy",
    "SequentialPolicy",
    "StaticBatchPolicy",
]

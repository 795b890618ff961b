"""Batching strategies: each decides which requests run in the next forward pass."""

from __future__ import annotations

from carpool.scheduling.base import SchedulerStats, SchedulingPolicy
from carpool.scheduling.continuous import ContinuousScheduler, SchedulerConfig
from carpool.scheduling.output import ScheduledChunk, SchedulerOutput

__all__ = [
    "ContinuousScheduler",
    "ScheduledChunk",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "SchedulingPolicy",
]

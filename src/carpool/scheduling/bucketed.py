"""Bucketed batching: static batches of requests with similar prompt lengths.

A padded static batch pads every prompt to the longest one of the batch; grouping prompts by
length first cuts that prefill padding. Buckets are inclusive upper bounds on the prompt length
(``(16, 64, 256)`` makes the buckets 1-16, 17-64, 65-256 and 257+). The next batch is drawn
from the bucket of the *oldest* waiting request, so no bucket starves; within the bucket,
first come, first served. Under the ``priority`` policy "oldest" becomes "first in
(effective priority, arrival) order", in the bucket too; aging keeps buckets from starving.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from carpool.kv_cache.block_manager import BlockManager
from carpool.request import Request
from carpool.scheduling.static import StaticBatchPolicy, StaticConfig


def log_spaced_boundaries(num_buckets: int, low: int, high: int) -> tuple[int, ...]:
    """``num_buckets`` bucket bounds spaced evenly in log scale from ``low`` to ``high``.

    Prompt lengths spread over orders of magnitude, so equal ratios (not equal widths) keep the
    padding fraction of every bucket alike. ``(4, 16, 1024)`` gives ``(16, 64, 256, 1024)``.
    """
    assert num_buckets >= 1 and 1 <= low <= high, (num_buckets, low, high)
    if num_buckets == 1:
        return (high,)
    ratio = (high / low) ** (1 / (num_buckets - 1))
    bounds = [round(low * ratio**k) for k in range(num_buckets)]
    bounds[-1] = high
    return tuple(sorted(set(bounds)))


@dataclass(frozen=True, kw_only=True)
class BucketedConfig(StaticConfig):
    """``StaticConfig`` plus the bucket bounds.

    Attributes:
        bucket_boundaries: strictly ascending inclusive upper prompt lengths.
    """

    bucket_boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.bucket_boundaries
        if not b or list(b) != sorted(set(b)) or b[0] < 1 or not all(isinstance(x, int) for x in b):
            raise ValueError(f"bucket_boundaries must be strictly ascending ints >= 1, got {b!r}")

    @classmethod
    def with_num_buckets(cls, num_buckets: int, **kwargs: int) -> BucketedConfig:
        """Log-spaced buckets from ``block_size`` to ``max_model_len``."""
        low = min(kwargs.get("block_size", 16), kwargs["max_model_len"])
        bounds = log_spaced_boundaries(num_buckets, max(1, low), kwargs["max_model_len"])
        return cls(bucket_boundaries=bounds, **kwargs)


class BucketedPolicy(StaticBatchPolicy):
    """Static batches drawn from one prompt-length bucket at a time (module docstring).

    Args:
        config: the limits and the bucket bounds.
        block_manager: the KV bookkeeping to use; a fresh one sized from ``config`` if None.
    """

    name = "bucketed"
    config: BucketedConfig

    def __init__(self, config: BucketedConfig, block_manager: BlockManager | None = None) -> None:
        super().__init__(config, block_manager)

    def bucket_of(self, req: Request) -> int:
        """Index of the request's bucket (``len(bucket_boundaries)`` for the overflow one)."""
        return bisect.bisect_left(self.config.bucket_boundaries, req.num_prompt_tokens)

    def _candidates(self, now: float) -> list[Request]:
        if not self.waiting:
            return []
        ordered = self.config.order.sorted(self.waiting, now)
        bucket = self.bucket_of(ordered[0])
        same = (r for r in ordered if self.bucket_of(r) == bucket)
        return list(itertools.islice(same, self.config.batch_size))

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

from carpool.config import EngineConfig
from carpool.kv_cache.block_manager import BlockManager
from carpool.request import Request
from carpool.scheduling.static import StaticBatchPolicy


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


class BucketedPolicy(StaticBatchPolicy):
    """Static batches drawn from one prompt-length bucket at a time (module docstring).

    Args:
        config: as for ``StaticBatchPolicy``, plus ``bucket_boundaries`` (strictly ascending
            inclusive upper prompt lengths, validated by ``EngineConfig``) or, when it is None,
            ``num_buckets`` log-spaced bounds from ``block_size`` to ``max_model_len``.
        block_manager: the KV bookkeeping.
        max_model_len: the engine's effective context limit.
    """

    name = "bucketed"

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, max_model_len: int
    ) -> None:
        super().__init__(config, block_manager, max_model_len)
        if config.bucket_boundaries is not None:
            self.bucket_boundaries = tuple(config.bucket_boundaries)
        else:
            low = max(1, min(config.block_size, max_model_len))
            self.bucket_boundaries = log_spaced_boundaries(config.num_buckets, low, max_model_len)

    def bucket_of(self, req: Request) -> int:
        """Index of the request's bucket (``len(bucket_boundaries)`` for the overflow one)."""
        return bisect.bisect_left(self.bucket_boundaries, req.num_prompt_tokens)

    def _candidates(self, now: float) -> list[Request]:
        if not self.waiting:
            return []
        ordered = self.order.sorted(self.waiting, now)
        bucket = self.bucket_of(ordered[0])
        same = (r for r in ordered if self.bucket_of(r) == bucket)
        return list(itertools.islice(same, self.batch_size))

"""Paged KV-cache bookkeeping (pure Python: no tensors here)."""

from __future__ import annotations

from carpool.kv_cache.block_manager import BlockManager
from carpool.kv_cache.prefix_cache import PrefixCacheStats, hash_block
from carpool.kv_cache.sizing import block_bytes, kv_cache_bytes, num_blocks_for_budget

__all__ = [
    "BlockManager",
    "PrefixCacheStats",
    "block_bytes",
    "hash_block",
    "kv_cache_bytes",
    "num_blocks_for_budget",
]

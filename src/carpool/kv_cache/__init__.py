"""Paged KV-cache bookkeeping (pure Python: no tensors here)."""

from __future__ import annotations

from carpool.kv_cache.block_manager import BlockManager
from carpool.kv_cache.prefix_cache import PrefixCacheStats, hash_block

__all__ = [
    "BlockManager",
    "PrefixCacheStats",
    "hash_block",
]

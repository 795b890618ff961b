"""Automatic prefix caching: which full KV blocks hold which token prefixes.

A *full* block is named by a chain hash: ``blake2b-128(parent block's hash, this block's token
ids, extra key)``. Because the parent's hash is folded in, equal hashes mean equal *prefixes*
(every token from position 0 to the block's end), not only equal block contents, so a request
can reuse the longest run of leading blocks whose hashes are known.

Hash collisions: the hash is 128 bits of ``hashlib.blake2b`` over a stable byte encoding
(little-endian int64 token ids), never Python's ``hash()`` (which is 64-bit and salted per
process). Two different prefixes share a hash with probability ~2^-128 per pair, so a hit is
trusted without comparing token ids; the stored hashes never leave the process.

This module holds the pure bookkeeping (no tensors): the hash -> block map and the
least-recently-used order of cached blocks that no request references. ``BlockManager`` owns
the reference counts and decides when a block enters or leaves it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# The parent "hash" of a request's first block; any fixed value works.
_ROOT = b"carpool-prefix-root"


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: bytes = b"") -> bytes:
    """The 128-bit chain hash of one full block.

    Args:
        parent: the hash of the previous block, None for a request's first block.
        token_ids: the block's token ids (exactly ``block_size`` of them).
        extra_key: anything else that changes the block's KV (a LoRA or multimodal id later);
            empty for plain text.

    Returns:
        16 bytes.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(_ROOT if parent is None else parent)
    # A length prefix keeps (extra_key, tokens) unambiguous.
    h.update(len(extra_key).to_bytes(4, "little"))
    h.update(extra_key)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, extra_key: bytes = b""
) -> list[bytes]:
    """Append to ``hashes`` the chain hashes of the full blocks of ``token_ids`` it lacks.

    ``hashes`` must already be the hashes of the first ``len(hashes)`` blocks of ``token_ids``
    (token lists only grow, so a memo stays valid). Returns ``hashes`` itself.
    """
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(
            hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_key)
        )
    return hashes


@dataclass
class PrefixCacheStats:
    """Counters of prefix-cache lookups, in prompt tokens (vLLM's counters count tokens too).

    Attributes:
        queries: tokens looked up (each admitted request's known tokens, counted per admission).
        hits: of those, tokens found cached (their prefill was skipped).
        evictions: cached blocks dropped to make room for an allocation.
    """

    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / queries, 0.0 before any query."""
        return self.hits / self.queries if self.queries else 0.0


class PrefixCache:
    """The hash -> block map and the LRU order of cached blocks nobody references.

    A block is *cached* while it has a hash here. A cached block whose reference count is 0 is
    *evictable*: it stays in the map (a later request may hit it) until an allocation that finds
    no plain free block takes the least recently released one.
    """

    def __init__(self) -> None:
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        # Evictable blocks, least recently released first (values unused).
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self.hash_of)

    def longest_hit(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest run of leading ``hashes`` that are cached."""
        blocks = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def insert(self, block: int, block_hash: bytes) -> bool:
        """Name ``block`` by ``block_hash``; False (and nothing changes) when the hash is
        already cached in another block (two requests computed the same prefix at once)."""
        if block_hash in self.block_of:
            return False
        assert block not in self.hash_of, f"block {block} is already cached"
        self.block_of[block_hash] = block
        self.hash_of[block] = block_hash
        return True

    def discard(self, block: int) -> None:
        """Forget ``block``'s hash (it may be reused for other tokens)."""
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.block_of[h]
        self.evictable.pop(block, None)

    def evict_lru(self) -> int:
        """Drop the least recently released evictable block from the cache and return it."""
        block, _ = self.evictable.popitem(last=False)
        self.discard(block)
        self.stats.evictions += 1
        return block

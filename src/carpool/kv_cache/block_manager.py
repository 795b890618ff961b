"""Paged KV-cache bookkeeping: which fixed-size blocks each request owns.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each. Token ``pos`` of a
request lives in slot ``table[pos // block_size] * block_size + pos % block_size`` of its block
table. This class only does the bookkeeping (pure Python, no tensors): a free list, a reference
count per block, one block table per request and, when ``enable_caching`` is on, the prefix
cache (``carpool.kv_cache.prefix_cache``) that lets requests share full blocks.

Resource calls come in a query/mutation pair: ``can_allocate``/``allocate`` take an absolute
token count, for a new request or one that already holds blocks (its table grows).

Every block is in exactly one of three states:

- *free*: on the free list, reference count 0, no hash;
- *evictable*: reference count 0 but still cached (it has a hash and can be hit);
- *held*: reference count >= 1 (the number of tables holding it), cached or not.

Prefix-cache life of a block: a request's block becomes cached once it is *full and computed*
(``cache_blocks``, called by the scheduler after the step that wrote it), so a cached block is
never written again: requests that hit it start computing at the next block boundary. When its
last holder frees it, a cached block becomes evictable instead of free; an allocation takes
plain free blocks first and evicts the least recently released evictable block only when none
is left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from carpool.config import DEFAULT_BLOCK_SIZE
from carpool.kv_cache.prefix_cache import PrefixCache, PrefixCacheStats, extend_block_hashes


class BlockManager:
    """Hands out and takes back KV-cache blocks, and caches full blocks by prefix.

    Freed blocks go to the *back* of the free list and allocation takes from the front, so
    block ids are deterministic for tests: a new manager hands out ``0, 1, 2, ...``.

    Args:
        num_blocks: blocks in the whole cache (>= 1).
        block_size: token slots per block (>= 1).
        enable_caching: keep full computed blocks cached for later requests with the same
            prefix (automatic prefix caching). Off, ``find_cached_prefix`` finds nothing and
            ``cache_blocks`` does nothing.
    """

    def __init__(
        self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, enable_caching: bool = False
    ) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Token slots reserved per request (<= len(table) * block_size).
        self._num_tokens: dict[str, int] = {}
        self._cache = PrefixCache()
        # Per request: chain hashes of its full blocks (a memo), and how many leading blocks of
        # its table have already been offered to the cache.
        self._hashes: dict[str, list[bytes]] = {}
        self._num_offered: dict[str, int] = {}

    # ---- queries -------------------------------------------------------------------------

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` token slots (ceiling division)."""
        assert num_tokens >= 0, f"num_tokens must be >= 0, got {num_tokens}"
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones plus evictable cached ones."""
        return len(self._free) + len(self._cache.evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a prefix hash (held or evictable)."""
        return len(self._cache)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, in [0, 1] (evictable cached blocks are free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Lookup and eviction counters (see ``record_lookup``)."""
        return self._cache.stats

    def num_table_blocks(self, request_id: str) -> int:
        """Blocks in ``request_id``'s table (0 for an unknown id); O(1)."""
        return len(self._tables.get(request_id, ()))

    def get_block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] for an unknown id)."""
        return list(self._tables.get(request_id, ()))

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that ``request_id``'s table holds ``num_tokens`` slots."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def block_hashes(
        self, request_id: str, token_ids: Sequence[int], extra_key: bytes = b""
    ) -> list[bytes]:
        """Chain hashes of the full blocks of ``token_ids`` (memoized per request until
        ``free``; the caller passes the same, possibly longer, token list each time)."""
        memo = self._hashes.setdefault(request_id, [])
        return extend_block_hashes(memo, token_ids, self.block_size, extra_key)

    def find_cached_prefix(
        self, request_id: str, token_ids: Sequence[int], extra_key: bytes = b""
    ) -> list[int]:
        """Blocks of the longest cached prefix of ``token_ids`` (a query: nothing is taken).

        The last token is never part of a hit, so that the request computes at least one token
        and has logits to sample from: only the full blocks of ``token_ids[:-1]`` can be hit.
        Returns [] when caching is off.
        """
        if not self.enable_caching or len(token_ids) < 2:
            return []
        hashes = self.block_hashes(request_id, token_ids, extra_key)
        max_blocks = (len(token_ids) - 1) // self.block_size
        return self._cache.longest_hit(hashes[:max_blocks])

    def can_allocate(
        self, request_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Whether ``allocate(request_id, num_tokens, computed_blocks)`` would succeed."""
        need = self.num_new_blocks(request_id, num_tokens) - len(computed_blocks)
        # Hit blocks nobody holds are evictable now; taking them shrinks what is left.
        taken = sum(1 for b in computed_blocks if self._ref_counts[b] == 0)
        return need <= self.num_free_blocks - taken

    # ---- mutations -----------------------------------------------------------------------

    def allocate(
        self, request_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int]:
        """Grow ``request_id``'s table so it holds ``num_tokens`` slots (creating it if new).

        A smaller ``num_tokens`` than already reserved is a no-op (tables never shrink here).
        Call ``can_allocate`` first.

        Args:
            computed_blocks: a new request's prefix hit (``find_cached_prefix``): these blocks
                start its table, shared (their reference counts go up), not copied.

        Returns:
            The block ids newly taken for the table (the hit excluded), in table order.
        """
        assert self.can_allocate(request_id, num_tokens, computed_blocks), (
            f"allocate({request_id!r}, {num_tokens}) needs "
            f"{self.num_new_blocks(request_id, num_tokens) - len(computed_blocks)} blocks, "
            f"{self.num_free_blocks} free: call can_allocate first"
        )
        table = self._tables.setdefault(request_id, [])
        if computed_blocks:
            assert not table, f"a prefix hit can only start a new table ({request_id!r})"
            for b in computed_blocks:
                assert b in self._cache.hash_of, f"hit block {b} is not cached"
                if self._ref_counts[b] == 0:
                    del self._cache.evictable[b]
                self._ref_counts[b] += 1
            table.extend(computed_blocks)
            self._num_offered[request_id] = len(computed_blocks)
        new = [self._take_block() for _ in range(self.num_new_blocks(request_id, num_tokens))]
        table.extend(new)
        self._num_tokens[request_id] = max(
            self._num_tokens.get(request_id, 0), num_tokens, len(computed_blocks) * self.block_size
        )
        return new

    def _take_block(self) -> int:
        """A block for a new slot: a plain free one, else the LRU evictable one."""
        b = self._free.popleft() if self._free else self._cache.evict_lru()
        assert self._ref_counts[b] == 0, f"free block {b} has refcount {self._ref_counts[b]}"
        self._ref_counts[b] = 1
        return b

    def cache_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        extra_key: bytes = b"",
    ) -> int:
        """Offer the request's full blocks whose KV is now computed to the prefix cache.

        Call it once the step that wrote them is done (never at scheduling time: a chunk may
        still be preempted or fail). A block whose prefix is already cached in another block
        stays private (it is freed as a plain block later). No-op when caching is off.

        Returns:
            How many blocks became cached.
        """
        if not self.enable_caching:
            return 0
        table = self._tables.get(request_id)
        assert table is not None, f"cache_blocks for unknown request {request_id!r}"
        full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_offered.get(request_id, 0)
        if full <= start:
            return 0
        hashes = self.block_hashes(request_id, token_ids[: full * self.block_size], extra_key)
        added = sum(self._cache.insert(table[i], hashes[i]) for i in range(start, full))
        self._num_offered[request_id] = full
        return added

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's prefix lookup (the scheduler calls it when it admits)."""
        assert 0 <= num_hit_tokens <= num_queried_tokens, (num_hit_tokens, num_queried_tokens)
        stats = self._cache.stats
        stats.queries += num_queried_tokens
        stats.hits += num_hit_tokens

    def free(self, request_id: str, discard: bool = False) -> list[int]:
        """Drop ``request_id``'s table; blocks whose count reaches 0 become free or evictable.

        Freeing an unknown (or already freed) id is a no-op, so finishing paths need not know
        whether a request ever got blocks. Cached blocks become evictable tail first, so the
        LRU order evicts the end of a prefix before its beginning (a tail block is useless
        without its head); plain blocks go to the back of the free list in table order.

        Args:
            discard: also drop the cached hashes of the blocks this frees (for a request whose
                KV may be wrong, e.g. its step failed).

        Returns:
            The block ids whose count reached 0, in table order.
        """
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_offered.pop(request_id, None)
        if table is None:
            return []
        released = []
        for b in table:
            assert self._ref_counts[b] > 0, f"block {b} of {request_id!r} has refcount 0"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                released.append(b)
                if discard:
                    self._cache.discard(b)
        for b in reversed(released):
            if b in self._cache.hash_of:
                self._cache.evictable[b] = None  # most recently released: evicted last
        self._free.extend(b for b in released if b not in self._cache.hash_of)
        return released

    # ---- invariants ----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert that no block is lost, doubly freed, miscounted or wrongly cached.

        Every block is exactly one of: on the free list once (refcount 0, no hash), evictable
        (refcount 0, cached), or held by tables with refcount equal to the number of tables
        holding it; each table holds a block at most once and has enough slots for its reserved
        tokens; the hash map and its inverse agree.
        """
        holders = [0] * self.num_blocks
        for rid, table in self._tables.items():
            assert len(set(table)) == len(table), f"table of {rid!r} repeats a block: {table}"
            assert len(table) == self.blocks_needed(self._num_tokens[rid]), (
                f"table of {rid!r} has {len(table)} blocks for {self._num_tokens[rid]} tokens"
            )
            for b in table:
                assert 0 <= b < self.num_blocks, f"table of {rid!r} holds bad block id {b}"
                holders[b] += 1
        cache = self._cache
        free_set = set(self._free)
        assert len(free_set) == len(self._free), f"free list repeats a block: {list(self._free)}"
        assert not free_set & set(cache.evictable), (
            f"blocks both free and evictable: {sorted(free_set & set(cache.evictable))}"
        )
        assert len(cache.block_of) == len(cache.hash_of), "hash map and its inverse differ"
        for h, b in cache.block_of.items():
            assert cache.hash_of.get(b) == h, f"block {b} is mapped by a hash it does not have"
        if not self.enable_caching:
            assert not cache.hash_of, "blocks cached with caching off"
        for b in range(self.num_blocks):
            cached = b in cache.hash_of
            if b in free_set:
                assert self._ref_counts[b] == 0 and holders[b] == 0 and not cached, (
                    f"free block {b} has refcount {self._ref_counts[b]}, {holders[b]} holders, "
                    f"cached={cached}"
                )
            elif b in cache.evictable:
                assert self._ref_counts[b] == 0 and holders[b] == 0 and cached, (
                    f"evictable block {b} has refcount {self._ref_counts[b]}, "
                    f"{holders[b]} holders, cached={cached}"
                )
            else:
                assert holders[b] > 0, f"block {b} is neither free nor held (lost)"
                assert self._ref_counts[b] == holders[b], (
                    f"block {b} has refcount {self._ref_counts[b]} but {holders[b]} holders"
                )

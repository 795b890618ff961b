"""Paged KV-cache bookkeeping: which fixed-size blocks each request owns.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each. Token ``pos`` of a
request lives in slot ``table[pos // block_size] * block_size + pos % block_size`` of its block
table. This class only does the bookkeeping (pure Python, no tensors): a free list, a reference
count per block (so a later prefix cache can share full blocks between requests) and one block
table per request.

Resource calls come in query/mutation pairs: ``can_allocate``/``allocate`` take an absolute token
count, ``can_append``/``append_slots`` grow a request that already holds blocks.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out and takes back KV-cache blocks.

    Freed blocks go to the *back* of the free list and allocation takes from the front, so a
    freshly freed block is reused last (what a prefix cache will want) and block ids are
    deterministic for tests: a new manager hands out ``0, 1, 2, ...``.

    Args:
        num_blocks: blocks in the whole cache (>= 1).
        block_size: token slots per block (>= 1).
    """

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Token slots reserved per request (<= len(table) * block_size).
        self._num_tokens: dict[str, int] = {}

    # ---- queries -------------------------------------------------------------------------

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` token slots (ceiling division)."""
        assert num_tokens >= 0, f"num_tokens must be >= 0, got {num_tokens}"
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def has_request(self, request_id: str) -> bool:
        """True when ``request_id`` holds a block table (possibly empty)."""
        return request_id in self._tables

    def num_tokens(self, request_id: str) -> int:
        """Token slots reserved for ``request_id`` (0 for an unknown id)."""
        return self._num_tokens.get(request_id, 0)

    def get_block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] for an unknown id)."""
        return list(self._tables.get(request_id, ()))

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that ``request_id``'s table holds ``num_tokens`` slots."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        """Whether ``allocate(request_id, num_tokens)`` would succeed."""
        return self.num_new_blocks(request_id, num_tokens) <= len(self._free)

    def can_append(self, request_id: str, num_new_tokens: int = 1) -> bool:
        """Whether the request can grow by ``num_new_tokens`` slots beyond what it reserved."""
        assert num_new_tokens >= 0, f"num_new_tokens must be >= 0, got {num_new_tokens}"
        return self.can_allocate(request_id, self.num_tokens(request_id) + num_new_tokens)

    # ---- mutations -----------------------------------------------------------------------

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow ``request_id``'s table so it holds ``num_tokens`` slots (creating it if new).

        A smaller ``num_tokens`` than already reserved is a no-op (tables never shrink here).
        Call ``can_allocate`` first.

        Returns:
            The block ids newly added to the table, in table order (possibly empty).
        """
        need = self.num_new_blocks(request_id, num_tokens)
        assert need <= len(self._free), (
            f"allocate({request_id!r}, {num_tokens}) needs {need} blocks, "
            f"{len(self._free)} free: call can_allocate first"
        )
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() for _ in range(need)]
        for b in new:
            assert self._ref_counts[b] == 0, f"free block {b} has refcount {self._ref_counts[b]}"
            self._ref_counts[b] = 1
        table.extend(new)
        self._num_tokens[request_id] = max(self._num_tokens.get(request_id, 0), num_tokens)
        return new

    def append_slots(self, request_id: str, total_tokens: int) -> list[int]:
        """Grow an existing request's table to ``total_tokens`` slots (see ``allocate``).

        Unlike ``allocate`` the request must already hold a table.
        """
        assert request_id in self._tables, f"append_slots for unknown request {request_id!r}"
        return self.allocate(request_id, total_tokens)

    append_slot = append_slots

    def share_prefix(self, src_request_id: str, dst_request_id: str, num_blocks: int) -> None:
        """Start ``dst``'s (new) table with the first ``num_blocks`` full blocks of ``src``.

        The blocks are shared, not copied: their reference counts go up by one. Only full blocks
        can be shared, because the owner keeps writing into its last partial block.
        """
        src = self._tables.get(src_request_id)
        assert src is not None, f"share_prefix from unknown request {src_request_id!r}"
        assert dst_request_id not in self._tables, (
            f"share_prefix into existing request {dst_request_id!r}"
        )
        full = self.num_tokens(src_request_id) // self.block_size
        assert 0 <= num_blocks <= full, (
            f"can share at most the {full} full blocks of {src_request_id!r}, asked {num_blocks}"
        )
        shared = src[:num_blocks]
        for b in shared:
            self._ref_counts[b] += 1
        self._tables[dst_request_id] = list(shared)
        self._num_tokens[dst_request_id] = num_blocks * self.block_size

    def free(self, request_id: str) -> list[int]:
        """Drop ``request_id``'s table; blocks whose count reaches 0 return to the free list.

        Freeing an unknown (or already freed) id is a no-op, so finishing paths need not know
        whether a request ever got blocks.

        Returns:
            The block ids that went back to the free list, in the order they were appended.
        """
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        if table is None:
            return []
        released = []
        for b in table:
            assert self._ref_counts[b] > 0, f"block {b} of {request_id!r} has refcount 0"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                released.append(b)
        self._free.extend(released)
        return released

    # ---- invariants ----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert that no block is lost, doubly freed or miscounted.

        Every block is either in the free list exactly once with refcount 0, or held by tables
        with refcount equal to the number of tables holding it; each table holds a block at most
        once and has enough slots for its reserved tokens.
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
        free_set = set(self._free)
        assert len(free_set) == len(self._free), f"free list repeats a block: {list(self._free)}"
        for b in range(self.num_blocks):
            if b in free_set:
                assert self._ref_counts[b] == 0 and holders[b] == 0, (
                    f"free block {b} has refcount {self._ref_counts[b]}, {holders[b]} holders"
                )
            else:
                assert holders[b] > 0, f"block {b} is neither free nor held (lost)"
                assert self._ref_counts[b] == holders[b], (
                    f"block {b} has refcount {self._ref_counts[b]} but {holders[b]} holders"
                )

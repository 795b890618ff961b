"""``KVMap``: one engine's KV block map for the dashboard, kept as numpy arrays.

A cell is one KV block (or, beyond ``MAX_CELLS`` blocks, several): ``FREE``, ``CACHED`` (kept
by a prefix cache) or the stable key of the request that holds it. Each new ``EngineView``
updates the map from what the block tables gained or lost since the previous view (a Python
loop over every block costs more than the rest of a frame), so a delta frame carries only the
cells that changed, ``[cell, value, cell, value, ...]``; a keyframe carries the whole map as
``[[value, count], ...]`` runs (a map is long runs of free blocks or of one owner). Request keys
instead of positions in the frame's request list keep a cell's value steady while its owner
lives, so a decoding batch changes a few cells per frame, not all of them.
"""

from __future__ import annotations

import itertools
import json

import numpy as np

from carpool.engine.view import EngineView

MAX_CELLS = 2048  # cells per engine; beyond, one cell stands for several blocks
MAX_CHANGES = 256  # more changed cells than this: send the whole map instead
FREE, CACHED = -1, -2  # cell values besides a request's key (>= 0)

_encode = json.JSONEncoder(separators=(",", ":")).encode


class KVMap:
    """The block map of one engine, updated from its views.

    Args:
        num_blocks: the engine's KV blocks (until a view says otherwise).
        block_size: tokens per block (likewise).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cached: int | None = None
        self.view: EngineView | None = None
        self._held: dict[int, tuple[int, ...]] = {}
        self._reshape(num_blocks)
        self._changes = ""  # the latest update's changed cells, encoded
        self._new = True  # no frame has carried this map yet
        self._whole = True  # the latest update's frame must carry the whole map
        self._runs: str | None = None  # the current map's runs, encoded (built on demand)

    def _reshape(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.per_cell = max(1, -(-num_blocks // MAX_CELLS))
        # per block, padded to whole cells (the padding stays FREE)
        self.blocks = np.full(-(-num_blocks // self.per_cell) * self.per_cell, FREE, np.int64)
        self.cells = self.blocks if self.per_cell == 1 else self._cells()
        self._held = {}  # request key -> its block table

    def _cells(self) -> np.ndarray:
        """Cells of several blocks show an owner if any block has one, else free if any
        block is free, else cached."""
        cells = self.blocks[0 :: self.per_cell].copy()
        for i in range(1, self.per_cell):  # (strided maxima: .max(axis=1) is 40x slower)
            np.maximum(cells, self.blocks[i :: self.per_cell], out=cells)
        return cells

    def update(self, view: EngineView | None, owners: list[int]) -> None:
        """Bring the map up to ``view`` (``owners``: the key of each of its requests, in
        order) and note which cells changed.

        Called once per frame tick; the same view again changes nothing. Block tables only
        grow while a request holds its blocks (they are released whole), so a request's
        blocks change only where its table grew; anything else (a new shape, a prefix cache)
        rebuilds the whole map with array operations.
        """
        whole, self._new = self._new, False
        self._changes = ""
        if view is self.view or view is None:
            self._whole = whole
            return
        self.view = view
        self.block_size = view.block_size
        self.cached = None if view.cached_block_ids is None else len(view.cached_block_ids)
        self._runs = None
        if view.num_blocks != self.num_blocks:
            self._reshape(view.num_blocks)
            whole = True
        old = self.cells
        if view.cached_block_ids is not None:
            changed = self._rebuild(view, owners)
        else:
            changed = self._follow(view, owners)
        if self.per_cell > 1:
            self.cells = self._cells()
            cells = np.flatnonzero(self.cells != old)
            changed = np.column_stack((cells, self.cells[cells])).ravel().tolist()
        elif changed is None:
            cells = np.flatnonzero(self.cells != old)
            changed = np.column_stack((cells, self.cells[cells])).ravel().tolist()
        self._whole = whole or len(changed) > 2 * MAX_CHANGES  # then the runs are shorter
        if not self._whole and changed:
            self._changes = _encode(changed)

    def _follow(self, view: EngineView, owners: list[int]) -> list[int]:
        """Update from the tables' growth; returns ``[block, value, ...]`` changed."""
        before, held = self._held, {}
        changes: dict[int, int] = {}
        for r, key in zip(view.requests, owners, strict=True):
            blocks = r.block_ids
            old = before.pop(key, ())
            held[key] = blocks
            # A table that kept its first and last blocks is the same table (a cheap test: a
            # request that lost its blocks gets others back, from the free list's far end).
            n, m = len(old), len(blocks)
            same = n == 0 or (n <= m and blocks[0] == old[0] and blocks[n - 1] == old[-1])
            if same and n == m:
                continue
            if same:  # grew: the new blocks only
                changes.update(dict.fromkeys(blocks[n:], key))
            else:  # replaced (preempted, say): free the old ones, take the new ones
                for b in old:
                    changes.setdefault(b, FREE)
                changes.update(dict.fromkeys(blocks, key))
        for old in before.values():  # finished or aborted: their blocks are free
            for b in old:
                changes.setdefault(b, FREE)
        self._held = held
        if not changes:
            return []
        n = len(changes)
        self.blocks[np.fromiter(changes, np.intp, n)] = np.fromiter(changes.values(), np.int64, n)
        return list(itertools.chain.from_iterable(changes.items()))

    def _rebuild(self, view: EngineView, owners: list[int]) -> None:
        """Rebuild every block (cached first, then the owners')."""
        blocks = np.full(len(self.blocks), FREE, dtype=np.int64)
        if view.cached_block_ids:
            blocks[np.asarray(view.cached_block_ids, dtype=np.int64)] = CACHED
        counts = [len(r.block_ids) for r in view.requests]
        total = sum(counts)
        if total:
            ids = np.fromiter(
                itertools.chain.from_iterable(r.block_ids for r in view.requests),
                dtype=np.int64,
                count=total,
            )
            blocks[ids] = np.repeat(np.asarray(owners, dtype=np.int64), counts)
        self.blocks = blocks
        if self.per_cell == 1:
            self.cells = blocks
        self._held = {key: r.block_ids for r, key in zip(view.requests, owners, strict=True)}

    def runs(self) -> str:
        """The whole map as ``[[value, count], ...]`` runs, encoded."""
        if self._runs is None:
            self._runs = _encode(run_lengths(self.cells))
        return self._runs

    def entry(self, replica: int, used: int, whole: bool) -> str:
        """This engine's ``kv`` entry of a frame, encoded: the whole map (``cells``) when
        ``whole`` (a keyframe) or when the latest update says so (a new map, a new shape, many
        changes), else the ``changes`` of the latest update."""
        cached = "null" if self.cached is None else self.cached
        head = (
            f'{{"replica":{replica},"num_blocks":{self.num_blocks},'
            f'"blocks_per_cell":{self.per_cell},"used":{used},"cached":{cached},'
            f'"block_size":{self.block_size}'
        )
        if whole or self._whole:
            return f'{head},"cells":{self.runs()}}}'
        return f'{head},"changes":{self._changes or "[]"}}}'


def run_lengths(cells: np.ndarray | list[int]) -> list[list[int]]:
    """``cells`` as ``[value, count]`` runs."""
    a = np.asarray(cells, dtype=np.int64)
    if not len(a):
        return []
    starts = np.concatenate(([0], np.flatnonzero(a[1:] != a[:-1]) + 1))
    counts = np.diff(np.append(starts, len(a)))
    return np.column_stack((a[starts], counts)).tolist()


def expand_runs(runs: list[list[int]]) -> list[int]:
    """The cells of ``[value, count]`` runs."""
    return [v for v, n in runs for _ in range(n)]

"""``KVMap``: one engine's KV block map for the dashboard, kept as a numpy array of cells.

A cell is one KV block (or, beyond ``MAX_CELLS`` blocks, several): ``FREE``, ``CACHED`` (kept
by a prefix cache) or the stable key of the request that holds it. The map is rebuilt from each
new ``EngineView`` with array operations (a Python loop over 2048 cells costs more than the rest
of a frame) and compared with the previous one, so a delta frame carries only the cells that
changed, ``[cell, value, cell, value, ...]``; a keyframe carries the whole map as
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
        self._reshape(num_blocks)
        self._changes = ""  # the latest update's changed cells, encoded
        self._new = True  # no frame has carried this map yet
        self._whole = True  # the latest update's frame must carry the whole map
        self._runs: str | None = None  # the current map's runs, encoded (built on demand)
        self._held: dict[int, tuple[int, ...]] = {}  # request key -> its block table

    def _reshape(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.per_cell = max(1, -(-num_blocks // MAX_CELLS))
        self.cells = np.full(-(-num_blocks // self.per_cell), FREE, dtype=np.int64)

    def update(self, view: EngineView | None, owners: list[int]) -> None:
        """Bring the map up to ``view`` (``owners``: the key of each of its requests, in
        order) and note which cells changed.

        Called once per frame tick; the same view again changes nothing. Block tables only
        grow while a request holds its blocks (they are released whole), so a request's cells
        change only where its table grew; anything else (a new shape, a prefix cache, cells
        shared by several blocks) rebuilds the whole map with array operations.
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
        if whole or self.per_cell > 1 or view.cached_block_ids is not None:
            changed = self._rebuild(view, owners)
        else:
            changed = self._follow(view, owners)
        self._whole = whole or changed is None or len(changed) > 2 * MAX_CHANGES
        if not self._whole and changed:
            self._changes = _encode(changed)

    def _follow(self, view: EngineView, owners: list[int]) -> list[int] | None:
        """Update from the tables' growth; returns ``[cell, value, ...]`` changed."""
        before, held = self._held, {}
        changes: dict[int, int] = {}
        for r, key in zip(view.requests, owners, strict=True):
            blocks = r.block_ids
            old = before.pop(key, ())
            held[key] = blocks
            n = len(old)
            if n == len(blocks) and (blocks is old or blocks == old):
                continue
            if n < len(blocks) and blocks[:n] == old:  # grew: the new blocks only
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
        cells = list(changes)
        values = list(changes.values())
        self.cells[cells] = values
        return [x for pair in zip(cells, values, strict=True) for x in pair]

    def _rebuild(self, view: EngineView, owners: list[int]) -> list[int] | None:
        """Rebuild every cell; returns ``[cell, value, ...]`` changed (None: too many)."""
        old, per_cell = self.cells, self.per_cell
        cells = np.full(len(old), FREE, dtype=np.int64)
        if view.cached_block_ids:
            cells[np.asarray(view.cached_block_ids, dtype=np.int64) // per_cell] = CACHED
        counts = [len(r.block_ids) for r in view.requests]
        total = sum(counts)
        if total:
            blocks = np.fromiter(
                itertools.chain.from_iterable(r.block_ids for r in view.requests),
                dtype=np.int64,
                count=total,
            )
            keys = np.repeat(np.asarray(owners, dtype=np.int64), counts)
            cells[blocks // per_cell if per_cell > 1 else blocks] = keys
        self.cells = cells
        self._held = {key: r.block_ids for r, key in zip(view.requests, owners, strict=True)}
        changed = np.flatnonzero(cells != old)
        if len(changed) > MAX_CHANGES:
            return None  # the runs are no longer than the changes
        return np.column_stack((changed, cells[changed])).ravel().tolist()

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

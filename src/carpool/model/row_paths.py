"""Which rows of a step take a quantized linear's *widened* weight: a prompt's rows.

A quantized linear has two ways to multiply (``carpool.model.quant``): its int4 / int8 kernels
read the codes as they are, the cost growing with the rows (a decode step's few rows: the
fastest there is), or the weight is widened to bf16 and multiplied by ``vnni_linear``'s AMX
loop, each 64-column block widened into a thread's buffer as the loop reaches it (~0.27 ms of
widening for SmolLM2's four layer matrices a call, then ~4 us a row where the kernels take
~36 us). The two round differently, so which one a row takes must
follow from the row alone, never from the rows beside it, or a request's greedy tokens would
depend on its batch, its chunking and the batching strategy (BENCHMARKS.md, issue 11, fortieth
pass: on an AMX machine 3 of 8 prompts changed tokens when a step's row count picked the path).
The rule, as for the attention's kernel rows (``paged_attention``): a *prompt* row at a
position of at least ``quant.wide_prompt_from`` (0: every prompt row) takes the widened
weight; every other row (every generated token's, also when recomputed after a preemption)
the kernels. The batch builders mark the rows (``WideRows``, in
``AttentionMetadata.wide_rows``) and the model's forward makes them current (``use``) while its
layers run; ``QuantizedLinear.forward`` reads them (``current``), where the layer takes wide
rows at all (``takes_wide_rows``: an int4 layer's kernels, on AMX 16-row tiles, beat the
widening up to ~160 rows a step, so by default every row of an int4 layer takes them:
``quant.WIDE_INT4_PROMPTS``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class WideRows:
    """The rows of a step of ``rows`` rows that take the widened weight: ``runs``, sorted,
    disjoint, non-empty ``[start, end)`` ranges of flat row indices, none touching the next."""

    rows: int
    runs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        last = -1
        for a, b in self.runs:
            assert last < a < b <= self.rows, f"WideRows: bad runs {self.runs} of {self.rows} rows"
            last = b

    @property
    def every_row(self) -> bool:
        """Whether every row of the step is a wide row."""
        return self.runs == ((0, self.rows),)

    @functools.cached_property
    def others(self) -> tuple[tuple[int, int], ...]:
        """The runs of the rows that are not wide rows (the kernels'), in order."""
        out, at = [], 0
        for a, b in self.runs:
            if a > at:
                out.append((at, a))
            at = b
        if at < self.rows:
            out.append((at, self.rows))
        return tuple(out)

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """The wide rows' flat indices (``[W]`` int64, CPU), in order."""
        return _indices(self.runs)

    @functools.cached_property
    def others_index(self) -> torch.Tensor:
        """The other rows' flat indices (``[T - W]`` int64, CPU), in order."""
        return _indices(self.others)

    def within(self, start: int, end: int) -> WideRows | None:
        """These rows among rows ``[start, end)``, counted from ``start`` (an MLP's row chunk);
        None where none of them is a wide row. Kept per chunk: every layer asks again."""
        key = (start, end)
        if key not in self._chunks:
            runs = tuple(
                (max(a, start) - start, min(b, end) - start)
                for a, b in self.runs
                if a < end and b > start
            )
            self._chunks[key] = WideRows(end - start, runs) if runs else None
        return self._chunks[key]

    @functools.cached_property
    def _chunks(self) -> dict[tuple[int, int], WideRows | None]:
        return {}


def _indices(runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return (
        torch.cat([torch.arange(a, b) for a, b in runs])
        if runs
        else torch.empty(0, dtype=torch.int64)
    )


def from_mask(wide: np.ndarray) -> WideRows | None:
    """``WideRows`` of a boolean mask over a step's flat rows (None where none is set)."""
    flat = np.asarray(wide, dtype=bool).reshape(-1)
    if not flat.any():
        return None
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    runs = tuple((int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True))
    return WideRows(len(flat), runs)


# The wide rows of the step whose layers are running in this thread (``rows``; unset: none, or
# outside a step). Per thread: two engines of one process (an AsyncEngine's loop beside another)
# may run steps at once.
_current = threading.local()


def current() -> WideRows | None:
    """The wide rows of the rows now passing through the model's layers (``use``)."""
    return getattr(_current, "rows", None)


@contextlib.contextmanager
def use(rows: WideRows | None) -> Iterator[None]:
    """Make ``rows`` current within this block (None: no wide rows); the outer value after it."""
    outer = current()
    _current.rows = rows
    try:
        yield
    finally:
        _current.rows = outer

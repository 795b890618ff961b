"""``EngineView``: the engine's requests and KV blocks at one instant, for the live dashboard.

``EngineSnapshot`` counts; a view names: which requests wait (and with what priority, once the
scheduler has priorities), which run and how far they got, and which KV blocks each one holds
(and which are cached, once prefix caching exists). Building one walks every unfinished request,
so the core builds it only while someone watches, at most every ``view_interval`` seconds
(``EngineCore.view_interval``). Like the snapshot it is frozen and picklable: a replica sends it
over its pipe inside a ``StepReport``.

``IterationEvent`` is what an ``EngineTap`` (the dashboard's frame builder) receives after each
loop iteration, whether the engine runs in-process or in a replica process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.outputs import RequestOutput
from carpool.request import RequestStatus

if TYPE_CHECKING:
    from carpool.engine.llm_engine import LLMEngine

_STATE = {
    RequestStatus.WAITING: "waiting",
    RequestStatus.RUNNING: "running",
    RequestStatus.PREEMPTED: "preempted",
}


@dataclass(frozen=True)
class RequestView:
    """One unfinished scheduler request (one of a prompt's ``n`` completions).

    Attributes:
        request_id: the scheduler request's id.
        state: ``waiting``, ``running`` or ``preempted`` (waits to be recomputed).
        arrival_time: engine-clock arrival.
        prompt_tokens: prompt length.
        computed_tokens: tokens whose KV is computed (prompt progress, then prompt + output).
        generated_tokens: tokens generated so far.
        max_tokens: the request's generation limit.
        block_ids: the KV blocks it holds, in table order.
        priority: the scheduler's priority, None while the scheduler has none.
    """

    request_id: str
    state: str
    arrival_time: float
    prompt_tokens: int
    computed_tokens: int
    generated_tokens: int
    max_tokens: int
    block_ids: tuple[int, ...] = ()
    priority: int | None = None


@dataclass(frozen=True)
class EngineView:
    """The requests and the KV cache of one engine at ``time`` (engine clock).

    Attributes:
        time: when it was taken.
        requests: every unfinished request, in arrival order.
        num_blocks, block_size: the cache's shape.
        num_free_blocks: blocks nobody holds.
        cached_block_ids: blocks kept for reuse by a prefix cache; None without one.
    """

    time: float
    requests: tuple[RequestView, ...] = ()
    num_blocks: int = 0
    block_size: int = 16
    num_free_blocks: int = 0
    cached_block_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class IterationEvent:
    """What an ``EngineTap`` sees after one loop iteration of one engine.

    Attributes:
        replica: which engine (0 for an in-process engine).
        record: the forward pass's figures; None when the model did not run.
        snapshot: the engine's counters afterwards.
        finished: ``(final output, reason)`` of requests that ended in the iteration.
        view: the engine's requests and blocks, when one was due (see ``view_interval``).
    """

    replica: int
    record: StepRecord | None
    snapshot: EngineSnapshot
    finished: Sequence[tuple[RequestOutput, str]] = ()
    view: EngineView | None = None


class EngineTap(Protocol):
    """Sees every iteration of an engine client (the dashboard). Registered with
    ``EngineClient.add_tap``; called from the engine thread (in-process) or the event loop
    (replicas), so it must be quick and thread-safe."""

    view_interval: float  # seconds between ``EngineView``s wanted (the core builds no more)

    def on_iteration(self, event: IterationEvent) -> None:
        """One iteration of one engine."""


class TapSet:
    """The taps of one engine client. Registering is copy-on-write, so the engine thread
    iterates a stable tuple without a lock.

    Args:
        on_interval: told the smallest ``view_interval`` wanted (None once no tap is left),
            to pass on to the core(s).
    """

    def __init__(self, on_interval: Callable[[float | None], None]) -> None:
        self.taps: tuple[EngineTap, ...] = ()
        self._on_interval = on_interval

    @property
    def view_interval(self) -> float | None:
        """The shortest interval any tap wants; None without taps."""
        return min((t.view_interval for t in self.taps), default=None)

    def add(self, tap: EngineTap) -> Callable[[], None]:
        """Register ``tap``; returns the function that removes it."""
        self.taps = (*self.taps, tap)
        self._on_interval(self.view_interval)

        def remove() -> None:
            self.taps = tuple(t for t in self.taps if t is not tap)
            self._on_interval(self.view_interval)

        return remove

    def emit(self, event: IterationEvent) -> None:
        """Show ``event`` to every tap."""
        for tap in self.taps:
            tap.on_iteration(event)


def build_view(engine: LLMEngine) -> EngineView:
    """The engine's requests and KV blocks now (call from the thread that owns the engine)."""
    bm = engine.block_manager
    views = []
    for group in engine.output_processor.groups():
        for req in group.requests:
            if req.is_finished:
                continue
            rid = req.request_id
            views.append(
                RequestView(
                    request_id=rid,
                    state=_STATE.get(req.status, "waiting"),
                    arrival_time=req.arrival_time,
                    prompt_tokens=req.num_prompt_tokens,
                    computed_tokens=req.num_computed_tokens,
                    generated_tokens=req.num_output_tokens,
                    max_tokens=req.sampling_params.max_tokens,
                    block_ids=tuple(bm.get_block_table(rid)),
                    # Optional features of other schedulers/caches: shown when present.
                    priority=getattr(req, "priority", None),
                )
            )
    cached = getattr(bm, "cached_block_ids", None)
    return EngineView(
        time=engine.clock(),
        requests=tuple(sorted(views, key=lambda v: v.arrival_time)),
        num_blocks=bm.num_blocks,
        block_size=bm.block_size,
        num_free_blocks=bm.num_free_blocks,
        cached_block_ids=tuple(cached()) if callable(cached) else None,
    )


__all__ = ["EngineTap", "EngineView", "IterationEvent", "RequestView", "TapSet", "build_view"]

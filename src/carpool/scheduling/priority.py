"""Request ordering: first come first served, or by priority with aging.

Priority follows vLLM: a request's ``priority`` is an int, *lower is served first*, default 0.
Under the ``priority`` policy requests are ordered by ``(effective priority, arrival time)``.

Aging (against starvation): a request's *effective* priority improves by 1 for every
``aging_s`` seconds since its arrival (engine clock)::

    effective = priority - floor((now - arrival_time) / aging_s)

so a priority-10 request that has waited ``10 x aging_s`` seconds ranks with a fresh
priority-0 one, and, being older, ahead of it. Running requests age the same way, so an aged
request that finally runs is not at once preempted by fresh better-priority arrivals. The rule
is a function of the clock only, so it is the same in every policy and testable with a fake
clock. ``aging_s=None`` turns aging off (pure priority, which can starve).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from carpool.config import SCHEDULING_POLICIES
from carpool.request import Request

# Preemption causes, as counted in ``SchedulerStats.num_preemptions_by_cause``.
PREEMPT_KV_CACHE = "kv_cache"  # a running request needed a block and none was left
PREEMPT_PRIORITY = "priority"  # a waiting request of strictly better priority took the place


@dataclass(frozen=True)
class RequestOrder:
    """How a policy orders waiting requests and picks priority victims.

    Attributes:
        policy: ``fcfs`` (arrival order; ``priority`` is ignored) or ``priority``.
        aging_s: seconds of waiting that improve the effective priority by 1 (None: no aging).
    """

    policy: str = "fcfs"
    aging_s: float | None = 10.0

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}"
            )
        if self.aging_s is not None and not (self.aging_s > 0 and math.isfinite(self.aging_s)):
            raise ValueError(f"priority aging_s must be > 0 seconds or None, got {self.aging_s!r}")

    @property
    def by_priority(self) -> bool:
        return self.policy == "priority"

    def effective_priority(self, req: Request, now: float) -> int:
        """``priority`` improved by aging (see the module docstring)."""
        if self.aging_s is None:
            return req.priority
        waited = max(0.0, now - req.arrival_time)
        return req.priority - int(waited // self.aging_s)

    def key(self, req: Request, now: float) -> tuple[int, float]:
        """Sort key: smaller runs first."""
        return (self.effective_priority(req, now), req.arrival_time)

    def sorted(self, requests: Iterable[Request], now: float) -> list[Request]:
        """``requests`` in service order (stable: ties keep their given order). Under
        ``fcfs`` the given order is kept as it is."""
        reqs = list(requests)
        if not self.by_priority:
            return reqs
        return sorted(reqs, key=lambda r: self.key(r, now))

    def worst(self, running: Sequence[Request], now: float) -> Request:
        """The running request a better one preempts: the worst effective priority, the latest
        arrival among equals, the most recently admitted among exact ties."""
        assert running, "no running request to preempt"
        i = max(range(len(running)), key=lambda i: (self.key(running[i], now), i))
        return running[i]

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        """Whether ``waiting`` may preempt ``running``: strictly better effective priority."""
        return self.by_priority and (
            self.effective_priority(waiting, now) < self.effective_priority(running, now)
        )

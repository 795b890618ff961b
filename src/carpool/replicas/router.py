"""Routing policies: which ready replica takes the next request.

A router sees only ``Candidate`` figures (pure Python, no processes), so it is tested alone.
The load of a replica comes from its own reports (running, waiting, KV usage after its latest
loop iteration) plus what the front end knows better than any report: requests it dispatched
that the replica has not reported yet (``in_transit``). Counting those is what spreads a burst
that arrives between two reports.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

ROUTING_POLICIES = ("least-loaded", "power-of-two", "round-robin")


@dataclass(frozen=True)
class Candidate:
    """One ready replica as the router sees it.

    Attributes:
        index: the replica's number.
        num_running: requests in its batch (its latest report).
        num_waiting: requests queued in its scheduler (its latest report).
        in_transit: requests sent to it that its latest report does not count yet.
        kv_cache_usage: fraction of its KV blocks in use (its latest report).
    """

    index: int
    num_running: int = 0
    num_waiting: int = 0
    in_transit: int = 0
    kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class LoadWeights:
    """Weights of the load score ``running*r + (waiting + in_transit)*w + kv_usage*k``.

    A running request slows every step of its batch by a little; a waiting one (or one in
    transit, which will wait first) has no seat yet and will wait behind the batch, so it
    counts double. KV usage near 1 means the next admissions risk preemption (recompute):
    a full cache weighs like four running requests.
    """

    running: float = 1.0
    waiting: float = 2.0
    kv_cache_usage: float = 4.0

    def score(self, c: Candidate) -> float:
        """The candidate's load (lower is lighter)."""
        return (
            self.running * c.num_running
            + self.waiting * (c.num_waiting + c.in_transit)
            + self.kv_cache_usage * c.kv_cache_usage
        )


class Router(ABC):
    """Picks a replica for each request."""

    name: str = ""

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate]) -> int:
        """The ``index`` of the replica that takes the request.

        Args:
            candidates: the ready replicas (at least one).
        """


class LeastLoadedRouter(Router):
    """The replica with the lowest load score; ties go round the replicas in turn."""

    name = "least-loaded"

    def __init__(self, weights: LoadWeights | None = None) -> None:
        self.weights = weights or LoadWeights()
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate]) -> int:
        start = next(self._turn) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=self.weights.score).index  # min keeps the first of equals


class PowerOfTwoRouter(Router):
    """Sample two replicas at random and take the lighter ("power of two choices").

    Nearly as good as least-loaded with many replicas, and robust to stale load figures: two
    front ends reading the same stale report do not all pile onto the one lightest replica.
    """

    name = "power-of-two"

    def __init__(self, weights: LoadWeights | None = None, seed: int | None = None) -> None:
        self.weights = weights or LoadWeights()
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate]) -> int:
        if len(candidates) == 1:
            return candidates[0].index
        a, b = self._rng.sample(list(candidates), 2)
        return min((a, b), key=self.weights.score).index


class RoundRobinRouter(Router):
    """Each ready replica in turn, blind to load (the baseline)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate]) -> int:
        return candidates[next(self._turn) % len(candidates)].index


def make_router(name: str, weights: LoadWeights | None = None, seed: int | None = None) -> Router:
    """The router called ``name`` (one of ``ROUTING_POLICIES``)."""
    if name == "least-loaded":
        return LeastLoadedRouter(weights)
    if name == "power-of-two":
        return PowerOfTwoRouter(weights, seed)
    if name == "round-robin":
        return RoundRobinRouter()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {ROUTING_POLICIES}")

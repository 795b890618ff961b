"""Scale-out on one machine: N engine processes behind one HTTP front end (see docs/scaling.md).

``ReplicaPool`` is an ``EngineClient`` like ``AsyncEngine``, so the OpenAI routes, validation,
streaming and errors are the single-engine server's own.
"""

from carpool.errors import ReplicaUnavailableError
from carpool.replicas.config import ReplicaPoolConfig
from carpool.replicas.pool import ReplicaPool
from carpool.replicas.replica import ReplicaState
from carpool.replicas.router import (
    ROUTING_POLICIES,
    Candidate,
    LeastLoadedRouter,
    LoadWeights,
    PowerOfTwoRouter,
    RoundRobinRouter,
    Router,
    make_router,
)

__all__ = [
    "ROUTING_POLICIES",
    "Candidate",
    "LeastLoadedRouter",
    "LoadWeights",
    "PowerOfTwoRouter",
    "ReplicaPool",
    "ReplicaPoolConfig",
    "ReplicaState",
    "ReplicaUnavailableError",
    "RoundRobinRouter",
    "Router",
    "make_router",
]

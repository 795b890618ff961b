"""Scale-out on one machine: N engine processes behind one HTTP front end (see docs/scaling.md).

``ReplicaPool`` has the interface the serving layer uses from ``AsyncEngine``, so the OpenAI
routes, validation, streaming and errors are the single-engine server's own.
"""

from carpool.replicas.pool import ModelView, ReplicaPool, ReplicaPoolConfig
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
from carpool.replicas.stream import RemoteStream, ReplicaUnavailableError

__all__ = [
    "ROUTING_POLICIES",
    "Candidate",
    "LeastLoadedRouter",
    "LoadWeights",
    "ModelView",
    "PowerOfTwoRouter",
    "RemoteStream",
    "ReplicaPool",
    "ReplicaPoolConfig",
    "ReplicaState",
    "ReplicaUnavailableError",
    "RoundRobinRouter",
    "Router",
    "make_router",
]

"""``ReplicaPoolConfig``: how many engine processes, where, and how requests are spread.

Admission (``max_queue``) and the default deadline (``request_timeout``) are the server's
(``ServerConfig``): they apply to the pool exactly as to one in-process engine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from carpool.config import EngineConfig, check_positive
from carpool.replicas.engine_process import ReplicaSpec
from carpool.replicas.router import ROUTING_POLICIES
from carpool.replicas.watchdog import beat_interval


@dataclass(frozen=True)
class ReplicaPoolConfig:
    """How many replicas, where, and how requests are spread.

    Attributes:
        engine_config: every replica's engine (its ``device`` is replaced per replica).
        num_replicas: engine processes (>= 1).
        devices: torch devices, cycled over the replicas (empty: ``engine_config.device``).
        routing: one of ``ROUTING_POLICIES``.
        threads_per_replica: torch threads of each replica (None: CPU cores / replicas).
        restart: restart a replica that died (after it had once been ready).
        restart_backoff: seconds before the first restart; doubles per consecutive failure.
        max_retries: how often a request that received nothing yet is sent to another replica
            when its replica dies.
        stop_timeout: seconds a replica gets to exit on shutdown before it is terminated.
        log_level: the replicas' root log level.
        liveness_timeout: seconds a replica may send nothing (no heartbeat, which its own
            thread sends every ``beat_interval`` s, outside the engine step) before it is
            marked down, its requests are retried or failed, and it is killed and restarted.
    """

    engine_config: EngineConfig
    num_replicas: int = 2
    devices: tuple[str, ...] = ()
    routing: str = "least-loaded"
    threads_per_replica: int | None = None
    restart: bool = True
    restart_backoff: float = 1.0
    max_retries: int = 1
    stop_timeout: float = 10.0
    log_level: int = logging.INFO
    liveness_timeout: float = 10.0

    def __post_init__(self) -> None:
        check_positive(self, "num_replicas", "threads_per_replica")
        if not self.liveness_timeout > 0:
            raise ValueError(
                "liveness_timeout (--replica-liveness-timeout) must be > 0, got "
                f"{self.liveness_timeout!r}"
            )
        check_positive(self, "max_retries", low=0)
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {self.routing!r}")

    def spec(self, index: int) -> ReplicaSpec:
        """How replica ``index`` is started."""
        devices = self.devices or (self.engine_config.device,)
        threads = self.threads_per_replica or max(1, (os.cpu_count() or 1) // self.num_replicas)
        return ReplicaSpec(
            index=index,
            engine_config=self.engine_config,
            device=devices[index % len(devices)],
            threads=threads,
            log_level=self.log_level,
            heartbeat_interval=beat_interval(self.liveness_timeout),
        )

"""Per-replica Prometheus series (label ``replica``), in the server's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from carpool.replicas.replica import ReplicaHandle, ReplicaState


class ReplicaMetrics:
    """Gauges of each replica's state and load, counters of routing and restarts.

    Args:
        registry: the server's registry (``ServerMetrics.registry``).
        model_name: the ``model_name`` label.
        num_replicas: replicas to create series for at once (so they show before any load).
    """

    def __init__(self, registry: CollectorRegistry, model_name: str, num_replicas: int) -> None:
        labels = ["model_name", "replica"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.up = gauge("carpool:replica_up", "1 while the replica is ready to take requests.")
        self.running = gauge(
            "carpool:replica_num_requests_running", "Requests in the replica's running batch."
        )
        self.waiting = gauge(
            "carpool:replica_num_requests_waiting",
            "Requests waiting in the replica's scheduler or in transit to it.",
        )
        self.kv_usage = gauge(
            "carpool:replica_kv_cache_usage_perc", "Fraction of the replica's KV blocks in use."
        )
        self.routed = Counter(
            "carpool:replica_requests_routed",
            "Requests the router sent to the replica (retries included).",
            labels,
            registry=registry,
        )
        self.restarts = Counter(
            "carpool:replica_restarts", "Times the replica process was restarted.", labels,
            registry=registry,
        )  # fmt: skip
        self.hangs = Counter(
            "carpool:replica_hangs",
            "Times the replica sent no heartbeat within --replica-liveness-timeout and was killed.",
            labels,
            registry=registry,
        )
        for i in range(num_replicas):
            for series in (self.up, self.running, self.waiting, self.kv_usage):
                series.labels(model_name, str(i)).set(0)
            for counter in (self.routed, self.restarts, self.hangs):
                counter.labels(model_name, str(i))
        self._restarts_seen: dict[int, int] = {}
        self._hangs_seen: dict[int, int] = {}

    def on_routed(self, handle: ReplicaHandle) -> None:
        """A request was sent to ``handle``."""
        self.routed.labels(self.model_name, str(handle.index)).inc()
        self.on_replica(handle)

    def on_replica(self, handle: ReplicaHandle) -> None:
        """``handle``'s state or load changed."""
        i = str(handle.index)
        self.up.labels(self.model_name, i).set(1 if handle.state is ReplicaState.READY else 0)
        self.running.labels(self.model_name, i).set(handle.load.num_running)
        self.waiting.labels(self.model_name, i).set(handle.load.num_waiting + handle.in_transit)
        self.kv_usage.labels(self.model_name, i).set(handle.load.kv_cache_usage)
        for counter, seen, total in (
            (self.restarts, self._restarts_seen, handle.restarts),
            (self.hangs, self._hangs_seen, handle.hangs),
        ):
            if total > seen.get(handle.index, 0):
                counter.labels(self.model_name, i).inc(total - seen.get(handle.index, 0))
                seen[handle.index] = total

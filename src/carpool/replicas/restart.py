"""What happens when a replica process exits (or the watchdog finds it hung): reroute or
fail its requests, restart it.

A request that received nothing yet is sent to another replica (up to ``max_retries``): a
non-streaming request (FINAL_ONLY outputs) receives nothing before it finishes, so it is always
retriable. One that already streamed tokens fails with ``ReplicaUnavailableError`` (503), since
its client has seen part of an answer. The replica restarts after a backoff that doubles per
consecutive failure, unless it never became ready (restarting would not help) or failed too
often in a row.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from carpool.errors import EngineStoppedError, ReplicaUnavailableError
from carpool.replicas.replica import Pulse, ReplicaHandle, ReplicaState

if TYPE_CHECKING:
    from carpool.replicas.pool import ReplicaPool

logger = logging.getLogger("carpool.replicas")

_MAX_CONSECUTIVE_FAILURES = 5  # a replica that dies this often in a row before ready: failed


class RestartPolicy:
    """The pool's reaction to replica exits (on the event loop).

    Args:
        pool: the pool whose replicas it watches.
    """

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self._tasks: set[asyncio.Future[Any]] = set()

    def cancel(self) -> None:
        """Stop pending restarts (shutdown)."""
        for task in self._tasks:
            task.cancel()

    def on_exit(self, handle: ReplicaHandle) -> None:
        """The current incarnation of ``handle`` exited."""
        pool = self.pool
        process = handle.process
        code = process.exitcode if process is not None else None
        handle.close_inbox()
        was_ready = handle.info is not None
        handle.info = None
        if pool.stopping or handle.state is ReplicaState.STOPPING:
            handle.state = ReplicaState.STOPPED
            pool.fail_all(handle, EngineStoppedError("the server shut down"))
            return
        logger.error(
            "replica %d (pid %s) exited with code %s; %d requests in flight",
            handle.index,
            handle.pid,
            code,
            len(pool.in_flight_on(handle.index)),
        )
        handle.last_error = handle.last_error or f"the process exited with code {code}"
        handle.state = ReplicaState.DOWN
        self.reroute(handle, "died")
        handle.load = type(handle.load)()
        if not was_ready:
            handle.consecutive_failures += 1
        never_ready = handle.restarts == 0 and not was_ready
        if (
            not pool.config.restart
            or never_ready
            or handle.consecutive_failures >= _MAX_CONSECUTIVE_FAILURES
        ):
            handle.state = ReplicaState.FAILED
            logger.error("replica %d is not restarted: %s", handle.index, handle.last_error)
        else:
            delay = pool.config.restart_backoff * 2 ** min(handle.consecutive_failures, 5)
            asyncio.get_running_loop().call_later(delay, self._restart, handle)
        pool.changed(handle)

    def reroute(self, handle: ReplicaHandle, what: str) -> None:
        """The lost replica's requests: retry those that received nothing, fail the others.

        Args:
            handle: the replica (no longer ready).
            what: what happened to it, for the error message ("died", "stopped answering").
        """
        pool = self.pool
        for flight in pool.in_flight_on(handle.index):
            del pool.flights[flight.submit.request_id]  # its deadline timer stays armed
            if flight.stream.received == 0 and flight.attempts <= pool.config.max_retries:
                try:
                    pool.dispatch(flight, exclude=handle.index)
                    logger.info("request %s retried on replica %d", flight.submit.request_id,
                                flight.replica)  # fmt: skip
                    continue
                except ReplicaUnavailableError:
                    pass
            pool.end(
                flight,
                ReplicaUnavailableError(
                    f"replica {handle.index} serving request {flight.submit.request_id} {what} "
                    f"({handle.last_error}); retry the request"
                ),
            )

    def _restart(self, handle: ReplicaHandle) -> None:
        pool = self.pool
        if pool.stopping or handle.state is not ReplicaState.DOWN:
            return
        handle.state = ReplicaState.STARTING
        handle.restarts += 1
        handle.last_error = None
        handle.pulse = Pulse()  # the old incarnation's silence is not the new one's
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            asyncio.to_thread(handle.spawn, loop, pool.on_message, pool.on_exit)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        pool.changed(handle)

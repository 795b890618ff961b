"""The front end's handle on one replica process: start it, talk to it, notice its death.

Each start is an *incarnation* with its own process, inbox queue and outbox pipe; messages of
an old incarnation that arrive late are recognised and dropped. A reader thread per incarnation
blocks on the pipe and hands every message to the event loop; when the process dies the pipe
reports end of file at once (the front end closed its copy of the child's end), which is how a
``SIGKILL`` is noticed without polling. The reader also notes when the incarnation was last
heard from (its ``Pulse``: heartbeats stop there), which the watchdog reads (``watchdog.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from carpool.replicas.engine_process import ReplicaSpec, replica_main
from carpool.replicas.messages import FromReplica, Heartbeat, LoadReport, ReplicaReady, ToReplica

logger = logging.getLogger("carpool.replicas")

_SPAWN = multiprocessing.get_context("spawn")


class ReplicaState(str, enum.Enum):
    """A replica's life: starting -> ready -> (down -> starting -> ready)* -> stopped.

    ``failed`` is final: the replica could not load its model, so restarting would not help.
    """

    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Pulse:
    """When one incarnation of a replica was last heard from (any message counts).

    Written by that incarnation's reader thread, read on the event loop: each field is one
    atomic store, and a stale read errs by one heartbeat at most.

    Attributes:
        last: ``time.monotonic()`` of the latest message.
        heard: a message arrived at all (before that, the interpreter may be importing).
    """

    last: float = 0.0
    heard: bool = False

    def beat(self) -> None:
        """A message arrived now."""
        self.last = time.monotonic()
        self.heard = True

    def age(self) -> float | None:
        """Seconds since the latest message (None: never heard from)."""
        return time.monotonic() - self.last if self.heard else None


OnMessage = Callable[["ReplicaHandle", int, FromReplica], None]
OnExit = Callable[["ReplicaHandle", int], None]


class ReplicaHandle:
    """One replica as the front end sees it (all fields are touched on the event loop only).

    Args:
        spec: how to start the replica process.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.state = ReplicaState.STOPPED
        self.incarnation = 0
        self.process: BaseProcess | None = None
        self.info: ReplicaReady | None = None
        self.load = LoadReport()
        self.num_sent = 0  # SubmitRequests sent to this incarnation
        self.num_routed = 0  # requests routed here, all incarnations
        self.restarts = 0
        self.hangs = 0  # times the watchdog found it silent and killed it
        self.pulse = Pulse()  # of the current incarnation (a fresh one per start)
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._inbox: Any = None  # multiprocessing.Queue of this incarnation
        self._started_at = 0.0

    # ---- queries ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The process id of the current incarnation."""
        return self.process.pid if self.process is not None else None

    @property
    def in_transit(self) -> int:
        """Requests sent that the replica's latest report does not count yet."""
        return max(0, self.num_sent - self.load.num_received)

    @property
    def is_ready(self) -> bool:
        return self.state is ReplicaState.READY

    def describe(self, num_in_flight: int = 0) -> dict[str, Any]:
        """The replica for ``/health``: state, pid, device, load, seconds since it was heard."""
        age = self.pulse.age() if self.process is not None else None
        return {
            "replica": self.index,
            "state": self.state.value,
            "pid": self.pid,
            "device": self.spec.device,
            "restarts": self.restarts,
            "hangs": self.hangs,
            "routed": self.num_routed,
            "last_error": self.last_error,
            "heartbeat_age": None if age is None else round(age, 3),
            "load": {
                "num_running": self.load.num_running,
                "num_waiting": self.load.num_waiting,
                "in_transit": self.in_transit,
                "kv_cache_usage": round(self.load.kv_cache_usage, 4),
                "num_in_flight": num_in_flight,
            },
        }

    # ---- life cycle -------------------------------------------------------------------------

    def spawn(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_exit: OnExit) -> int:
        """Start a new incarnation (a fresh interpreter loads the model) and its reader thread.

        Blocking for as long as ``Process.start`` takes: call it off the event loop.

        Returns:
            The new incarnation number.
        """
        self.incarnation += 1
        incarnation = self.incarnation
        self.pulse = pulse = Pulse()
        inbox = _SPAWN.Queue()
        inbox.cancel_join_thread()  # never let an abandoned queue block the interpreter's exit
        reader, writer = _SPAWN.Pipe(duplex=False)
        process = _SPAWN.Process(
            target=replica_main,
            args=(self.spec, inbox, writer),
            name=f"carpool-replica-{self.index}",
            daemon=True,
        )
        process.start()
        writer.close()  # only the child holds the writing end: its death is an EOF here
        self._inbox, self.process = inbox, process
        self.num_sent = 0
        self.load = LoadReport()
        self.info = None
        self._started_at = time.monotonic()
        threading.Thread(
            target=self._read,
            args=(reader, process, incarnation, pulse, loop, on_message, on_exit),
            name=f"carpool-replica-{self.index}-reader",
            daemon=True,
        ).start()
        logger.info(
            "replica %d starting (pid %s, device %s, incarnation %d)",
            self.index,
            process.pid,
            self.spec.device,
            incarnation,
        )
        return incarnation

    def send(self, msg: ToReplica) -> bool:
        """Queue ``msg`` for the replica (never blocks). False when there is no process."""
        if self._inbox is None:
            return False
        try:
            self._inbox.put(msg)
        except (ValueError, OSError):  # the queue was closed
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the current process (a stopped or hung one ignores SIGTERM); never blocks.

        Its exit reaches ``on_exit`` through the reader thread, as any death does.
        """
        if self.process is not None:
            with contextlib.suppress(OSError, ValueError):  # already gone or closed
                self.process.kill()

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the process to exit, then terminate, then kill it.

        Blocking: call it off the event loop. The caller sends ``Shutdown`` first.
        """
        process = self.process
        if process is None:
            return
        process.join(timeout)
        if process.is_alive():
            logger.warning("replica %d did not exit in %.0fs; terminating", self.index, timeout)
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        self.close_inbox()

    def close_inbox(self) -> None:
        """Drop this incarnation's inbox (its feeder thread may be blocked on a dead reader)."""
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                self._inbox.close()
            self._inbox = None

    def _read(
        self,
        conn: Connection,
        process: BaseProcess,
        incarnation: int,
        pulse: Pulse,
        loop: asyncio.AbstractEventLoop,
        on_message: OnMessage,
        on_exit: OnExit,
    ) -> None:
        """The reader thread: hand each message to the loop; report the exit on end of file."""
        try:
            while True:
                msg = conn.recv()
                pulse.beat()
                if not isinstance(msg, Heartbeat):  # a heartbeat's news is its arrival
                    loop.call_soon_threadsafe(on_message, self, incarnation, msg)
        except (EOFError, OSError):
            pass
        except Exception:  # a message that does not unpickle: treat the replica as broken
            logger.exception("replica %d sent an unreadable message", self.index)
            with contextlib.suppress(Exception):
                process.kill()
        finally:
            conn.close()
        process.join(5)  # the pipe closes when the process dies; the exit code follows at once
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(on_exit, self, incarnation)

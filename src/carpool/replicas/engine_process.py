"""The replica process: one ``EngineCore`` whose results go over a pipe to the front end.

Started with the ``spawn`` context (a fresh interpreter: no forked torch threads or locks)::

    inbox (Queue) ─► feeder thread: SubmitRequest / AbortRequest / Shutdown ─► core inbox
                     (and, when the parent process is gone, a shutdown)
    main thread:     EngineCore.run ─► each CoreStep ─► StepReport ─► outbox (Pipe)
    heartbeat thread: a Heartbeat every ``heartbeat_interval`` s ─► outbox (from before the
                     model loads; a long step is no silence, a stopped process is)

The loop is ``EngineCore``'s, the same one ``AsyncEngine`` runs in a thread: only the transport
differs. It never polls; the feeder wakes at least once a second to notice a dead parent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from carpool.config import EngineConfig
from carpool.engine.core import EngineCore, NewRequest
from carpool.engine.llm_engine import LLMEngine
from carpool.replicas.messages import (
    AbortRequest,
    FromReplica,
    Heartbeat,
    ReplicaCrashed,
    ReplicaReady,
    Shutdown,
    StepReport,
    Watch,
)

logger = logging.getLogger("carpool.replica")

_PARENT_CHECK_S = 1.0  # longest blocking wait, so an orphaned replica exits within a second


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica process is started with (pickled into the new interpreter).

    Attributes:
        index: the replica's number (0-based), in logs, metrics and reports.
        engine_config: the engine to build; its ``device`` is replaced by ``device``.
        device: the torch device of this replica (``cpu``, ``cuda:1``).
        threads: torch intra-op threads (``torch.set_num_threads``); None leaves torch's default.
        log_level: the root logger level in the replica.
        heartbeat_interval: seconds between two ``Heartbeat`` messages.
    """

    index: int
    engine_config: EngineConfig
    device: str = "cpu"
    threads: int | None = None
    log_level: int = logging.INFO
    heartbeat_interval: float = 1.0


class Outbox:
    """The replica's end of the pipe, shared by the engine loop and the heartbeat thread.

    ``Connection.send`` is not thread-safe (two writers could interleave their bytes), so
    messages are pickled by the caller and written whole under a lock; the front end's
    ``Connection.recv`` unpickles them as usual.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, msg: FromReplica) -> None:
        """Send ``msg`` (raises ``OSError``/``BrokenPipeError`` when the front end is gone)."""
        data = ForkingPickler.dumps(msg)
        with self._lock:
            self._conn.send_bytes(data)


def replica_main(spec: ReplicaSpec, inbox: multiprocessing.Queue, conn: Connection) -> None:
    """Entry point of the replica process: load, report ready, serve until told to stop."""
    # Ctrl-C in a terminal signals the whole process group; the front end decides when the
    # replicas stop (after draining), so the replica ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s [replica {spec.index}] %(name)s: %(message)s",
    )
    outbox = Outbox(conn)
    threading.Thread(
        target=beat, args=(outbox, spec), name="carpool-replica-heartbeat", daemon=True
    ).start()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
        with contextlib.suppress(RuntimeError):  # only allowed before any parallel work
            torch.set_num_interop_threads(spec.threads)

    try:
        engine = LLMEngine(replace(spec.engine_config, device=spec.device))
    except BaseException as e:
        logger.exception("replica %d failed to load the model", spec.index)
        with contextlib.suppress(OSError):
            outbox.send(ReplicaCrashed(spec.index, f"failed to load the model: {e}"))
        sys.exit(1)
    outbox.send(ReplicaReady(spec.index, os.getpid(), spec.device, engine.limits))
    logger.info("replica %d ready (pid %d, device %s)", spec.index, os.getpid(), spec.device)
    core = EngineCore(engine)
    threading.Thread(
        target=feed, args=(inbox, core), name="carpool-replica-feeder", daemon=True
    ).start()
    try:
        core.run(lambda step: outbox.send(StepReport.of(spec.index, step)))
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the front end is gone
    except BaseException as e:
        logger.exception("replica %d engine loop failed", spec.index)
        with contextlib.suppress(OSError):
            outbox.send(ReplicaCrashed(spec.index, f"the engine failed: {e}"))
        sys.exit(1)


def beat(outbox: Outbox, spec: ReplicaSpec) -> None:
    """Say the process is alive every ``spec.heartbeat_interval`` s, until the pipe closes.

    Its own thread, outside the engine step: torch releases the GIL in its kernels and
    Python switches threads every few milliseconds otherwise, so a long step still beats.
    """
    while True:
        try:
            outbox.send(Heartbeat(spec.index))
        except (OSError, EOFError):
            return  # the front end is gone
        time.sleep(spec.heartbeat_interval)


def feed(inbox: multiprocessing.Queue, core: EngineCore) -> None:
    """Move the front end's messages into the core; shut it down when the front end is gone."""
    while True:
        try:
            msg = inbox.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if not _parent_alive():
                core.shutdown()
                return
            continue
        except (EOFError, OSError):
            core.shutdown()
            return
        if isinstance(msg, NewRequest):
            core.add_request(msg)
        elif isinstance(msg, AbortRequest):
            core.abort_request(msg.request_id)
        elif isinstance(msg, Watch):
            core.view_interval = msg.view_interval
        elif isinstance(msg, Shutdown):
            core.shutdown()
            return


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()

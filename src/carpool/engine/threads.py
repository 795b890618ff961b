"""How many torch threads the forward pass uses (``EngineConfig.threads``).

The default is measured, not torch's (one thread per core): on this project's 2-vCPU machine
shared with other processes, torch's default was 7-17x slower than one thread, because its
OpenMP workers spin and wait for each other whenever any core is taken by someone else. The
numbers behind ``DEFAULT_THREADS`` are in BENCHMARKS.md ("Threads").

Which thread runs torch matters too. OpenMP (libgomp, in torch's wheels) gives each thread that
opens a parallel region a pool of worker threads that lives as long as that thread, and counts
them all: once the process holds more of them than it has cores, every worker spins only ~1,000
times at a barrier before it sleeps on a futex, so each of a step's hundreds of parallel regions
pays a sleep and a wake-up. An engine loaded on the main thread (a pool that lives on) and
stepped on a second thread (another pool) decoded at half the speed of the same engine loaded
and stepped on one thread, at 2 threads on 2 cores (383 against 793 tokens/s; BENCHMARKS.md,
"Forty-fifth pass"), and so did every 2-thread server until then. Hence ``run_in_own_thread``:
load an engine that another thread will step in a thread that ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from carpool.config import AUTO_THREADS

logger = logging.getLogger("carpool.engine")

T = TypeVar("T")

#: Threads used when ``EngineConfig.threads`` is None (capped at the CPU cores).
DEFAULT_THREADS = 1


_SYSFS_CPU = Path("/sys/devices/system/cpu")


def _affinity() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """The CPU cores this process may run on (logical CPUs: hyperthreads each)."""
    return len(_affinity())


def physical_cores(sysfs: Path = _SYSFS_CPU) -> int:
    """The physical cores among the CPUs this process may run on: a core's hyperthreads count
    once (what llama.cpp starts its threads by default; two threads on one core's siblings
    share its vector units). Every CPU counts as a core where the topology cannot be read."""
    cpus = _affinity()
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """``DEFAULT_THREADS``, but never more than the cores this process may run on."""
    return max(1, min(DEFAULT_THREADS, available_cores()))


def resolve_threads(threads: int | str | None) -> int:
    """``EngineConfig.threads`` as a count on this machine: None -> ``default_threads()``,
    ``"auto"`` -> ``physical_cores()``."""
    if threads is None:
        return default_threads()
    if threads == AUTO_THREADS:
        return physical_cores()
    assert isinstance(threads, int) and threads >= 1, f"threads: {threads!r}"
    return threads


def apply_threads(threads: int | str | None) -> int:
    """Set torch's intra-op (and, while still allowed, inter-op) threads; return the count
    (``resolve_threads``).

    The setting is per process: several engines in one process share the last one set, and a
    replica process sets its own.
    """
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    # Inter-op threads can only be set before the first parallel work of the process.
    with contextlib.suppress(RuntimeError):
        if torch.get_num_interop_threads() != n:
            torch.set_num_interop_threads(n)
    return n


def run_in_own_thread(fn: Callable[..., T], *args: Any, name: str = "carpool-load") -> T:
    """``fn(*args)`` in a new thread that ends when it returns; its result, or its exception
    raised here.

    Work that opens OpenMP parallel regions (loading, converting and warming up a model) leaves
    a pool of OpenMP workers behind on the thread that ran it for as long as that thread lives;
    a thread that ends takes its pool with it. Load here an engine that a different, long-lived
    thread will step (``AsyncEngine``), so that thread's pool is the process's only one.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    # A daemon: Ctrl-C during a long load ends the process without waiting for the load.
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    assert result, f"{name}: the thread ended without a result"
    return result[0]

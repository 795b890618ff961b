"""How many torch threads the forward pass uses (``EngineConfig.threads``).

The default is measured, not torch's (one thread per core): on this project's 2-vCPU machine
shared with other processes, torch's default was 7-17x slower than one thread, because its
OpenMP workers spin and wait for each other whenever any core is taken by someone else. The
numbers behind ``DEFAULT_THREADS`` are in BENCHMARKS.md ("Threads").
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger("carpool.engine")

#: Threads used when ``EngineConfig.threads`` is None (capped at the CPU cores).
DEFAULT_THREADS = 1


def default_threads() -> int:
    """``DEFAULT_THREADS``, but never more than the cores this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cores))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op (and, while still allowed, inter-op) threads; return the count.

    The setting is per process: several engines in one process share the last one set, and a
    replica process sets its own.
    """
    n = threads if threads is not None else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    # Inter-op threads can only be set before the first parallel work of the process.
    with contextlib.suppress(RuntimeError):
        if torch.get_num_interop_threads() != n:
            torch.set_num_interop_threads(n)
    return n

"""carpool's CPU allocator: a step's large temporaries in blocks of their own, reused.

``csrc/cpu_allocator.cpp`` (its header has the why and the numbers) serves every CPU request of
at least ``min_bytes()`` (256 KiB) from a free list of blocks of its size class (at most 1/8 over
the request), or from a fresh anonymous mapping, and keeps a freed block for the next request of
its class; smaller requests go on to torch's allocator. A prefill step's layers then reuse the
blocks the layer before them freed, instead of spreading over glibc's heap. ``release()`` unmaps
the free blocks: ``pages.trim_heap`` calls it wherever carpool trims the heap (after a load, the
weights' move, a prefill step). ``end_step()``, after every step (``worker.heap``), unmaps the
blocks that no request has taken for ``IDLE_STEPS`` steps: sizes that did not come again (a
server's prompts of every length) do not pile up.

``load_model`` installs it before loading on the CPU, once per process, for the rest of the
process (tensors allocated before keep their own deleters). ``CARPOOL_CPU_ALLOCATOR=0`` leaves
torch's allocator alone. Where the library cannot be built (no compiler), nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carpool.model import kernel_build

ENV_ALLOCATOR = "CARPOOL_CPU_ALLOCATOR"
# A free block that no request took for this many whole steps is unmapped. A decode step
# takes again the blocks the step before it freed (the same shapes), so they stay.
IDLE_STEPS = 2

_lib = kernel_build.Library(
    "carpool_cpu_allocator",
    kernel_build.CSRC / "cpu_allocator.cpp",
    "carpool's CPU allocator",
    env=ENV_ALLOCATOR,
)
_installed = False


@dataclass(frozen=True)
class AllocatorStats:
    """The block allocator's counters, in bytes and counts (all 0 before ``install``)."""

    mapped: int  # bytes of blocks mapped, in use or free
    cached: int  # bytes of free blocks waiting for a request of their class
    maps: int  # blocks mapped so far
    reuses: int  # requests served from a free block


def install() -> bool:
    """Put the block allocator in front of torch's CPU allocator (first call in the process;
    built the first time on this machine). True once installed; False when turned off or the
    library cannot be built (torch's allocator then serves everything, as before)."""
    global _installed
    if _installed:
        return True
    if not _lib.load():
        return False
    torch.ops.carpool.cpu_allocator_install()
    _installed = True
    return True


def installed() -> bool:
    """True when this process's CPU tensors come through the block allocator."""
    return _installed


def release() -> int:
    """Unmap every free block; the bytes returned to the system (0 when not installed)."""
    if not _installed:
        return 0
    return int(torch.ops.carpool.cpu_allocator_release())


def end_step(max_idle: int = IDLE_STEPS) -> int:
    """A step ended: unmap the free blocks no request has taken for ``max_idle`` whole steps;
    the bytes returned to the system (0 when not installed)."""
    if not _installed:
        return 0
    return int(torch.ops.carpool.cpu_allocator_end_step(max_idle))


def stats() -> AllocatorStats:
    """The allocator's counters now."""
    if not _installed:
        return AllocatorStats(0, 0, 0, 0)
    return AllocatorStats(*(int(v) for v in torch.ops.carpool.cpu_allocator_stats()))


def min_bytes() -> int:
    """The smallest request served from blocks (smaller ones go to torch's allocator)."""
    if not _installed:
        raise RuntimeError("carpool's CPU allocator is not installed")
    return int(torch.ops.carpool.cpu_allocator_min_bytes())


def set_min_bytes(n: int) -> None:
    """Serve requests of at least ``n`` bytes from blocks from now on; ``1 << 62`` sends every
    new request to torch's allocator (an A/B in one process: ``benchmarks/ab_cpu_allocator.py``).
    Blocks already handed out come back to their lists either way."""
    if not _installed:
        raise RuntimeError("carpool's CPU allocator is not installed")
    torch.ops.carpool.cpu_allocator_set_min_bytes(n)


def size_class(n: int) -> int:
    """The bytes of the block a request of ``n`` bytes gets (at most 1/8 over, page-rounded)."""
    if not _lib.load():
        raise RuntimeError("carpool's CPU allocator could not be built")
    return int(torch.ops.carpool.cpu_allocator_size_class(n))

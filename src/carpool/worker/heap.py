"""Giving a large step's freed memory back to the operating system.

A prefill of many tokens allocates tens of MB of short-lived tensors (a 1,024-token step of
SmolLM2-135M: ~80 MiB above the resident size between steps). glibc's allocator keeps what
they freed: its adaptive mmap threshold grows past those sizes, so they come from the heap, and
freed heap memory stays resident (fragmented, mostly not at the top where glibc trims by itself).
After such a step the process then holds that memory for good, although no tensor uses it: 117
MiB through a batch-32 round of SmolLM2 (``malloc_trim(0)`` gave it back), more than the model's
KV cache. ``malloc_trim`` after a step of at least ``TRIM_AFTER_TOKENS`` tokens returns it;
decode steps (small temporaries, reused from step to step) are left alone, so they fault
nothing in anew. Fixing the mmap threshold instead (``mallopt``) cost 6% of batch-32 decode
speed and 1.5x prefill time (BENCHMARKS.md, issue 11's seventh pass); this costs neither.

Since the sixteenth pass large temporaries come from carpool's block allocator
(``carpool.model.cpu_allocator``), not the heap; the trim unmaps its free blocks too, and every
step ends with ``cpu_allocator.end_step`` (blocks idle for a few steps unmapped).
"""

from __future__ import annotations

import functools

import torch

from carpool.model import cpu_allocator, pages

# Steps of at least this many tokens are followed by a trim: prefill chunks, not decode steps
# (up to max_num_seqs tokens; a trim costs ~0.1-1 ms, nothing next to a 256-token step).
TRIM_AFTER_TOKENS = 256


class _Counter:
    trims = 0


def trims() -> int:
    """How many times ``release_after`` trimmed in this process (tests check the policy)."""
    return _Counter.trims


@functools.lru_cache(maxsize=16)
def _on_cpu(device: torch.device | str) -> bool:
    # Cached: called after every step.
    return torch.device(device).type == "cpu"


def release_after(num_tokens: int, device: torch.device | str) -> bool:
    """Return freed heap memory to the OS after a CPU step of ``num_tokens`` tokens, when that
    is at least ``TRIM_AFTER_TOKENS`` and the C library has ``malloc_trim``; True if it did."""
    if not _on_cpu(device):
        return False
    # Every step: the block allocator's blocks that no step has wanted for a while go back.
    cpu_allocator.end_step()
    if num_tokens < TRIM_AFTER_TOKENS:
        return False
    if not pages.trim_heap():
        return False
    _Counter.trims += 1
    return True

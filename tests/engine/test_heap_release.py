"""A large step's freed memory goes back to the OS (``carpool.worker.heap``): trimmed after
prefill steps of at least ``TRIM_AFTER_TOKENS`` tokens, never after decode steps, and it
really lowers the resident size that freed, fragmented heap memory held."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from carpool.model import cpu_allocator, pages
from carpool.worker import heap
from helpers.hf_models import save_tiny_model_dir

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or pages._malloc_trim() is None,
    reason="malloc_trim is glibc's",
)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_policy_by_step_size_and_device(monkeypatch):
    calls = []
    monkeypatch.setattr(pages, "_malloc_trim", lambda: calls.append)
    assert not heap.release_after(heap.TRIM_AFTER_TOKENS - 1, "cpu")
    assert not heap.release_after(10_000, "meta")  # only the CPU's heap is the process's
    before = heap.trims()
    assert heap.release_after(heap.TRIM_AFTER_TOKENS, "cpu")
    assert calls == [0] and heap.trims() == before + 1


def test_without_malloc_trim_nothing_is_called(monkeypatch):
    monkeypatch.setattr(pages, "_malloc_trim", lambda: None)
    assert not heap.release_after(10_000, "cpu")


@glibc
def test_trim_returns_fragmented_free_memory():
    # Raise glibc's mmap threshold as a run of large temporaries does (freeing an mmapped
    # block raises it), then leave freed blocks between live ones: resident, never trimmed.
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: 32 MiB, blocks below come from the heap
    # These 1 MiB tensors from glibc's heap, not carpool's block allocator (load_model installs
    # it for the process: test_cpu_allocator.py covers its blocks).
    blocks_from = cpu_allocator.min_bytes() if cpu_allocator.installed() else None
    if blocks_from is not None:
        cpu_allocator.set_min_bytes(1 << 62)
    try:
        blocks = [torch.ones(1 << 18) for _ in range(64)]  # 64 x 1 MiB, touched
        del blocks[::2]  # 32 MiB freed between the live half
        held = _rss_kib()
        assert heap.release_after(heap.TRIM_AFTER_TOKENS, "cpu")
        assert held - _rss_kib() > 16 << 10, "less than 16 MiB of the 32 freed came back"
        del blocks
    finally:
        libc.mallopt(-3, 128 << 10)  # glibc's default threshold (adaptive again after a free)
        if blocks_from is not None:
            cpu_allocator.set_min_bytes(blocks_from)


def test_engine_trims_after_prefill_not_decode(tmp_path, monkeypatch):
    from carpool import LLM, SamplingParams

    monkeypatch.setattr(heap, "TRIM_AFTER_TOKENS", 40)
    save_tiny_model_dir("llama", tmp_path)
    llm = LLM(tmp_path, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    before = heap.trims()
    llm.generate([list(range(3, 50))], params, use_tqdm=False)  # 47-token prefill, 7 decodes
    assert heap.trims() == before + (pages._malloc_trim() is not None)
    before = heap.trims()
    llm.generate([list(range(3, 20))], params, use_tqdm=False)  # 17-token prefill
    assert heap.trims() == before

"""carpool's CPU block allocator (``cpu_allocator``): large requests come from blocks of their
size class and freed blocks serve the next request of that class; small requests, torch's
allocator; ``release`` (and so every heap trim) unmaps the free blocks; oneDNN's raw buffers,
frees from other threads and the off switch; the same greedy tokens with the blocks as without.

``load_model`` installs it in this process (the whole suite runs on it after the first CPU
load); the tests here install it themselves first, which is the same call."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from carpool.model import cpu_allocator, pages

pytestmark = pytest.mark.skipif(
    not cpu_allocator.install(), reason="the allocator's C++ library cannot be built here"
)

MIB = 1 << 20


def test_a_large_tensor_comes_from_a_block_and_its_block_serves_the_next_of_its_class():
    cpu_allocator.release()  # no free block of this class left by earlier tests
    n = 3 * MIB + 100_000
    before = cpu_allocator.stats()
    x = torch.empty(n, dtype=torch.uint8)
    mid = cpu_allocator.stats()
    assert mid.maps == before.maps + 1
    assert mid.mapped - before.mapped == cpu_allocator.size_class(n)
    ptr = x.data_ptr()
    assert ptr % 4096 == 0, "a block is a mapping of its own, page-aligned"
    del x
    freed = cpu_allocator.stats()
    assert freed.cached - mid.cached == cpu_allocator.size_class(n)
    # A request a little smaller falls in the same class: the same block, nothing mapped.
    assert cpu_allocator.size_class(n - 50_000) == cpu_allocator.size_class(n)
    y = torch.empty(n - 50_000, dtype=torch.uint8)
    after = cpu_allocator.stats()
    assert y.data_ptr() == ptr
    assert after.maps == freed.maps and after.reuses == freed.reuses + 1
    assert after.cached == freed.cached - cpu_allocator.size_class(n)


def test_small_tensors_go_to_torchs_allocator():
    before = cpu_allocator.stats()
    small = [torch.empty(cpu_allocator.min_bytes() // 4 - 1, dtype=torch.float32)]
    small += [torch.ones(1000) for _ in range(10)]
    del small
    after = cpu_allocator.stats()
    assert (after.maps, after.reuses, after.mapped) == (before.maps, before.reuses, before.mapped)


def test_release_unmaps_the_free_blocks_and_a_heap_trim_releases_them_too():
    blocks = [torch.empty(MIB + 4096 * i, dtype=torch.uint8) for i in range(4)]
    mapped = cpu_allocator.stats().mapped
    del blocks
    cached = cpu_allocator.stats().cached
    assert cached >= 4 * MIB
    assert cpu_allocator.release() == cached
    after = cpu_allocator.stats()
    assert after.cached == 0 and after.mapped == mapped - cached

    t = torch.empty(2 * MIB, dtype=torch.uint8)
    del t
    assert cpu_allocator.stats().cached > 0
    pages.trim_heap()
    assert cpu_allocator.stats().cached == 0


def test_blocks_idle_for_whole_steps_are_unmapped_and_those_taken_again_stay():
    cpu_allocator.release()
    kept = torch.empty(2 * MIB, dtype=torch.uint8)
    idle = torch.empty(5 * MIB, dtype=torch.uint8)
    del kept, idle
    assert cpu_allocator.stats().cached >= 7 * MIB
    for _ in range(cpu_allocator.IDLE_STEPS):
        # A step that takes the 2 MiB block again (a decode step's same shapes) and frees it.
        t = torch.empty(2 * MIB, dtype=torch.uint8)
        del t
        assert cpu_allocator.end_step() == 0, "no block has been idle for long enough yet"
    t = torch.empty(2 * MIB, dtype=torch.uint8)
    del t
    assert cpu_allocator.end_step() == cpu_allocator.size_class(5 * MIB)
    assert cpu_allocator.stats().cached == cpu_allocator.size_class(2 * MIB)
    with pytest.raises(RuntimeError, match="max_idle must be >= 0"):
        cpu_allocator.end_step(-1)


def test_every_cpu_step_ends_with_the_allocators_end_step(monkeypatch):
    from carpool.worker import heap

    calls = []
    monkeypatch.setattr(cpu_allocator, "end_step", lambda: calls.append(1) or 0)
    heap.release_after(1, "cpu")
    heap.release_after(heap.TRIM_AFTER_TOKENS, "cpu")
    heap.release_after(1, "meta")
    assert len(calls) == 2


@pytest.mark.parametrize("n", [1, 4095, 4096, 256 << 10, (256 << 10) + 1, 3 * MIB, 1 << 30])
def test_a_size_class_is_at_most_an_eighth_over_and_a_whole_number_of_pages(n):
    c = cpu_allocator.size_class(n)
    assert c >= n and c % 4096 == 0
    assert c <= max(n + n // 8, 4096)
    assert cpu_allocator.size_class(c) == c, "a class is its own class"


def test_size_classes_are_monotonic():
    sizes = range(200_000, 3_000_000, 7_919)
    classes = [cpu_allocator.size_class(n) for n in sizes]
    assert classes == sorted(classes)


def test_onednn_matmuls_with_scratch_buffers_compute_through_it():
    # A bf16 GEMM this size packs its operands in oneDNN scratch buffers (raw_allocate and
    # raw_deallocate: both go through the allocator's deleter).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 576, generator=g)
    w = torch.randn(3072, 576, generator=g)
    ref = a @ w.t()
    for _ in range(3):
        got = (a.bfloat16() @ w.bfloat16().t()).float()
        torch.testing.assert_close(got, ref, atol=0.5, rtol=0.05)


def test_a_block_freed_on_another_thread_goes_back_to_its_list():
    cpu_allocator.release()
    x = torch.empty(2 * MIB, dtype=torch.uint8)
    box = [x]
    del x
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert cpu_allocator.stats().cached >= 2 * MIB


def test_raising_min_bytes_sends_new_requests_to_torch():
    old = cpu_allocator.min_bytes()
    try:
        cpu_allocator.set_min_bytes(1 << 62)
        before = cpu_allocator.stats()
        x = torch.empty(8 * MIB, dtype=torch.uint8)
        assert cpu_allocator.stats().mapped == before.mapped
        del x
    finally:
        cpu_allocator.set_min_bytes(old)
    with pytest.raises(RuntimeError, match="min_bytes must be positive"):
        cpu_allocator.set_min_bytes(0)


def test_the_engine_gives_the_same_tokens_from_blocks_as_from_torchs_allocator(tmp_path):
    # Prefill chunks of 96 tokens (logits and MLP activations past 256 KiB) and decode, mixed:
    # the same greedy tokens with every large temporary on a reused block (holding an earlier
    # tensor's bytes) as with torch's allocator.
    from carpool import LLM, SamplingParams
    from helpers.hf_models import save_tiny_model_dir

    save_tiny_model_dir("llama", tmp_path, vocab_size=16384)
    prompts = [[3 + (11 * i) % 9000 for i in range(n)] for n in (130, 7, 60, 200)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm = LLM(tmp_path, dtype="float32", max_num_batched_tokens=96, max_num_seqs=4)
    before = cpu_allocator.stats()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert cpu_allocator.stats().reuses > before.reuses, "the steps reused blocks"
    old = cpu_allocator.min_bytes()
    try:
        cpu_allocator.set_min_bytes(1 << 62)
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        cpu_allocator.set_min_bytes(old)
    assert got == want


# In fresh processes: whether load_model installs it (and the switch that stops it).
PROBE = """
import json, sys
from carpool.model import cpu_allocator
from carpool.model.loader import load_model
load_model(sys.argv[1], dtype="float32")
print(json.dumps(dict(installed=cpu_allocator.installed(), maps=cpu_allocator.stats().maps)))
"""


@pytest.mark.parametrize("switch", ["1", "0"])
def test_load_model_installs_it_unless_switched_off(tmp_path, switch, monkeypatch):
    from helpers.hf_models import save_tiny_hf_model

    save_tiny_hf_model("llama", tmp_path, vocab_size=16384)  # a 4 MiB embedding: one block
    monkeypatch.setenv(cpu_allocator.ENV_ALLOCATOR, switch)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if switch == "1":
        assert r["installed"] and r["maps"] >= 1
    else:
        assert r == {"installed": False, "maps": 0}


def test_torch_profiler_counts_the_blocks_memory():
    # profile_memory=True reads each allocator's reports: a block handed out and given back
    # shows in the op's "CPU Mem" as torch's own allocator's would.
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1024, 1024)  # 4 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = x * 2
        del y
    rows = [e for e in prof.key_averages() if e.key == "aten::mul"]
    assert rows and rows[0].cpu_memory_usage >= 4 * MIB, rows

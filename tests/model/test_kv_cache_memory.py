"""The KV cache is zero but not resident until written (``pages.zeroed_lazily``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a fresh process: the test process's own RSS moves with whatever earlier tests left
# running (threads, servers, caches), which would drown a 512 MiB signal only by luck.
PROBE = """
import json, sys, torch
from carpool.model.pages import zeroed_lazily

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

dtype = getattr(torch, sys.argv[1])
shape = (8192, 16, 2, 8, 64)
before = rss_mib()
cache = zeroed_lazily(shape, dtype, "cpu")
allocated = rss_mib()
cache[:512].fill_(1.0)  # 1/16 of the blocks
written = rss_mib()
# Read only after measuring: reading untouched pages may fault some in, depending on the
# kernel's transparent huge page settings.
zero = not bool(cache[512::97].any())
ok = float(cache[:512].float().mean()) == 1.0 and not bool(cache[512:].any())
print(json.dumps(dict(
    size=cache.numel() * dtype.itemsize / 2**20, alloc=allocated - before,
    written=written - before, zero=zero, ok=ok, shape=list(cache.shape),
    dtype=str(cache.dtype), contiguous=cache.is_contiguous(),
)))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_is_zero_and_resident_only_where_written(dtype):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, dtype], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    assert r["shape"] == [8192, 16, 2, 8, 64] and r["dtype"] == f"torch.{dtype}"
    assert r["contiguous"] and r["zero"] and r["ok"]
    size = r["size"]  # 1 GiB in float32, 512 MiB in bfloat16
    assert r["alloc"] < size / 16, f"the whole cache became resident at allocation: {r}"
    # 1/16 of the blocks written: about that much became resident.
    assert size / 32 < r["written"] < size / 4, r


# After freed heap memory that was written (the GGUF loader's temporaries), a cache below
# glibc's largest mmap threshold (32 MiB; SmolLM2-135M's layers at 32 x 96 tokens are 2.4 MB
# each): calloc (numpy's zeros) served it from that heap memory, cleared with memset, and the
# whole cache was resident at start. Here its own mapping holds only what was written.
REUSE_PROBE = """
import numpy as np, torch
from carpool.model.pages import zeroed_lazily

np.ones(30 << 20, dtype=np.uint8).sum()  # mapped and freed: the mmap threshold rises to 30 MiB
temp = np.ones(28 << 20, dtype=np.uint8)  # now on the heap, written
guard = np.ones(1 << 20, dtype=np.uint8)  # keeps temp's memory off the heap's top when freed
del temp
cache = zeroed_lazily((768, 16, 2, 8, 64), torch.bfloat16, "cpu")  # 24 MiB
cache[:48].fill_(1.0)  # 1/16 of the blocks
addr = cache.data_ptr()
rss_kib = None
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line: start-end perms ...
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            inside = lo <= addr < hi
        elif inside and head[0] == "Rss:":
            rss_kib = int(head[1])
            break
print(rss_kib / 1024)
"""


def test_kv_cache_below_the_mmap_threshold_is_not_resident_after_heap_reuse():
    out = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, check=True
    )
    resident_mib = float(out.stdout.strip())
    assert resident_mib < 24 / 4, f"{resident_mib:.1f} MiB of the 24 MiB cache resident"


# A cache of a huge page or more starts on a 2 MiB boundary and its mapping carries the
# kernel's huge-page advice ("hg" in the mapping's VmFlags), so decode attention, which reads
# blocks all over the cache, walks no 4 KiB page tables where THP is enabled.
HUGE_PROBE = """
import torch
from carpool.model.pages import HUGE_PAGE, zeroed_lazily

cache = zeroed_lazily((256, 16, 2, 8, 64), torch.bfloat16, "cpu")  # 4 MiB
small = zeroed_lazily((4, 16, 2, 8, 64), torch.bfloat16, "cpu")  # 64 KiB: 4 KiB pages
assert not bool(cache.any()) and cache.is_contiguous()
flags = {}
with open("/proc/self/smaps") as f:
    lo = hi = None
    for line in f:
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
        elif head[0] == "VmFlags:":
            for name, t in (("cache", cache), ("small", small)):
                if lo <= t.data_ptr() < hi:
                    flags[name] = head[1:]
print(cache.data_ptr() % HUGE_PAGE, "hg" in flags["cache"], "hg" in flags["small"])
"""


def test_a_large_kv_cache_is_aligned_and_advised_for_huge_pages():
    out = subprocess.run(
        [sys.executable, "-c", HUGE_PROBE], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0", "True", "False"], out.stdout + out.stderr

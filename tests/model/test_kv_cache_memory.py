"""The KV cache is zero but not resident until written (``llama.zeroed_lazily``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a fresh process: the test process's own RSS moves with whatever earlier tests left
# running (threads, servers, caches), which would drown a 512 MiB signal only by luck.
PROBE = """
import json, sys, torch
from carpool.model.llama import zeroed_lazily

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

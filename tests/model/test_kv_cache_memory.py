"""The KV cache is zero but not resident until written (``llama.zeroed_lazily``)."""

from __future__ import annotations

import pytest
import torch

from carpool.model.llama import zeroed_lazily


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_is_zero_and_resident_only_where_written(dtype):
    shape = (4096, 16, 2, 4, 64)  # 256 MiB in float32, 128 MiB in bfloat16
    size_mib = torch.Size(shape).numel() * dtype.itemsize / 2**20
    before = _rss_mib()
    cache = zeroed_lazily(shape, dtype, "cpu")
    assert cache.shape == shape and cache.dtype == dtype and cache.is_contiguous()
    assert not bool(cache[::97].any())  # zero (reading maps the shared zero page)
    assert _rss_mib() - before < size_mib / 8, "the whole cache became resident at allocation"
    cache[:256].fill_(1.0)  # 1/16 of the blocks written: about that much becomes resident
    grown = _rss_mib() - before
    assert size_mib / 32 < grown < size_mib / 4, (grown, size_mib)
    assert float(cache[:256].float().mean()) == 1.0 and not bool(cache[256:].any())

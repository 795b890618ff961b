"""Shared pytest setup: make ``tests/helpers`` importable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers.devices import DEVICES  # noqa: E402 (after the path above)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device-parametrized test once per device: the CPU, and CUDA where present."""
    return request.param


# The quantized kernels' row limits (carpool.model.fused_ops): on a CPU without a bf16 GEMM they
# take every row count (ANY_ROWS), elsewhere a prefill's rows go to the weight widened for a
# dense GEMM. Each fixture sets one configuration, so that both are tested on any CPU.
@pytest.fixture
def finite_row_limits(monkeypatch):
    """Limits of 128 rows where this CPU has none (a CPU with a bf16 GEMM has 4-128): the
    paths past them (the widened weight's GEMM, a head's rescored logits) run here too."""
    from carpool.model import fused_ops

    for name in fused_ops.ROW_LIMITS:
        if getattr(fused_ops, name) == fused_ops.ANY_ROWS:
            monkeypatch.setattr(fused_ops, name, 128)


@pytest.fixture
def kernels_at_every_row_count(monkeypatch):
    """The fused kernels take every row count, as on a CPU without a bf16 GEMM."""
    from carpool.model import fused_ops

    for name in fused_ops.ROW_LIMITS:
        monkeypatch.setattr(fused_ops, name, fused_ops.ANY_ROWS)

"""Measure the machine's roofline: matmul peak (FLOP/s) and memory bandwidth (bytes/s).

A benchmark that reports tokens/s alone cannot say whether more is possible; dividing the FLOP/s
and bytes/s a run achieved by these two probes says which roof bounds it (see PERF-NOTES.md).
Both probes take the best of a few repeats, since a shared machine only ever slows them down.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Roofline:
    """Measured peaks of this machine.

    Attributes:
        peak_flops: matmul FLOP/s in ``dtype``.
        bandwidth: memory read bytes/s (a large reduction).
        dtype: the matmul dtype (float32 for a bf16 model on a CPU without bf16 arithmetic:
            ``peak_dtype``).
        device: torch device.
    """

    peak_flops: float
    bandwidth: float
    dtype: str
    device: str

    @property
    def ridge_intensity(self) -> float:
        """FLOP per byte at which a kernel turns from memory-bound to compute-bound."""
        return self.peak_flops / self.bandwidth

    def best_of(self, other: Roofline) -> Roofline:
        """The higher of each peak: a busy machine only lowers a probe, so more tries help."""
        return Roofline(
            max(self.peak_flops, other.peak_flops),
            max(self.bandwidth, other.bandwidth),
            self.dtype,
            self.device,
        )

    def to_dict(self) -> dict[str, float | str]:
        """Plain values for JSON."""
        return {**asdict(self), "ridge_intensity": self.ridge_intensity}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: object, repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    assert callable(fn)
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu", size: int = 1024, repeats: int = 10
) -> float:
    """FLOP/s of a square ``size x size`` matmul (``2 size^3`` FLOP) in ``dtype``."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)
    seconds = _best_time(lambda: torch.mm(a, b), repeats, dev)
    return 2 * size**3 / seconds


def memory_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Read bytes/s of a sum over a float32 tensor of ``nbytes`` (far larger than the caches)."""
    dev = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    seconds = _best_time(lambda: x.sum(), repeats, dev)
    return nbytes / seconds


# Square matmul sizes the FLOP/s probe tries (the best counts). Why two: on the AMX Xeon VM a
# 1024-square bf16 matmul measured 315-445 GFLOP/s in most fresh processes (per-call costs
# around a ~2 ms product) and ~1,140 in others, while 2048 measured 540-790 in the same slow
# phase: with 1024 alone `carpool bench` reported prefill at 203% of the "peak".
PROBE_SIZES = (1024, 2048)


def peak_dtype(dtype: torch.dtype, device: str = "cpu") -> torch.dtype:
    """The dtype whose matmul bounds ``dtype``'s: float32 for bf16 on a CPU without bf16
    arithmetic (no AVX-512 BF16 or AMX: ``fused_ops.bf16_emulated``), where carpool's bf16
    kernels multiply in float32 FMAs and torch's own bf16 matmul takes generic loops (0.7
    GFLOP/s on an AMD Zen 2 against 138 for float32: a "percent of peak" of 15,000%)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        from carpool.model import fused_ops

        if fused_ops.bf16_emulated():
            return torch.float32
    return dtype


def measure_roofline(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Roofline:
    """Run both probes (one to two seconds on a CPU); the matmul one in ``peak_dtype(dtype)``."""
    probe = peak_dtype(dtype, device)
    return Roofline(
        peak_flops=max(matmul_flops(probe, device, size=s, repeats=5) for s in PROBE_SIZES),
        bandwidth=memory_bandwidth(device),
        dtype=str(probe).replace("torch.", ""),
        device=device,
    )

"""Linear layers on a CPU without bf16 GEMM units (AVX2 only, e.g. AMD Zen 3): per-call times.

    PYTHONPATH=src python benchmarks/bf16_linear.py --threads 2

Three tables (medians of ``--repeats`` calls, microseconds):
1. bf16 weights: torch's bf16 ``linear``, torch's float32 one (MKL), oneDNN's float32 linear on
   a packed weight, and carpool's ``bf16_linear`` (the C++ kernel, called directly).
2. Quantized weights: torch's int4 / int8 weight-only kernels against carpool's ``int4_gemv`` /
   ``int8_gemv`` (1-4 rows), per row.
3. int8 weights beyond the kernels' rows: torch's int8 kernel against widening the codes to
   bf16 and ``bf16_linear`` (``quant.Int8Linear``'s path above ``INT8_WIDEN_ABOVE_ROWS``).
BENCHMARKS.md "Fifth pass" has a run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
import torch.nn.functional as F

from carpool.model import fused_ops
from carpool.model.quant import Int4Linear, Int8Linear, int4_row_block


def timed(repeats: int, fn, *args) -> float:
    """Median microseconds of ``repeats`` calls ``fn(*args)`` after 3 warm-up calls."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def bf16_table(repeats: int) -> None:
    print("| weight | rows | torch bf16 | torch float32 | oneDNN float32 packed | bf16_linear |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, k in [(1536, 512), (2816, 512), (32000, 512)]:
        w32 = torch.randn(n, k)
        w16 = w32.bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w32, 32)
        for rows in (1, 4, 8, 16, 32):
            x16 = torch.randn(rows, k).bfloat16()
            x32 = x16.float()
            t_bf16 = timed(repeats, F.linear, x16, w16)
            t_fp32 = timed(repeats, F.linear, x32, w32)
            dnn = torch.ops.mkldnn._linear_pointwise
            t_dnn = timed(repeats, dnn, x32, packed, None, "none", [], "")
            t_ours = timed(repeats, torch.ops.carpool.bf16_linear, x16, w16, None)
            print(
                f"| {n} x {k} | {rows} | {t_bf16:.0f} | {t_fp32:.0f} | {t_dnn:.0f} "
                f"| {t_ours:.0f} ({2 * rows * n * k / t_ours / 1e3:.0f} GFLOP/s) |"
            )


def widened_int8(x: torch.Tensor, q8: Int8Linear) -> torch.Tensor:
    """``Int8Linear``'s path above ``INT8_WIDEN_ABOVE_ROWS`` where bf16 GEMM is emulated."""
    return torch.ops.carpool.bf16_linear(x, q8.qweight.to(torch.bfloat16), None) * q8.scales


def quant_table(repeats: int) -> None:
    n, k = 1536, 576
    q4 = Int4Linear.from_float(torch.randn(n, k), None, torch.float32)
    q8 = Int8Linear.from_float(torch.randn(n, k), None, torch.float32)
    block = int4_row_block()
    print(f"\n{n} x {k}, us per call (per row):")
    print("| rows | torch int4 | int4_gemv | torch int8 | int8_gemv |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (1, 2, 4):
        x = torch.randn(rows, k)
        xb = x.bfloat16()
        int4_torch = torch.ops.aten._weight_int4pack_mm_for_cpu
        t4 = timed(repeats, int4_torch, xb, q4.packed, 32, q4.scales_zeros)
        o4 = timed(repeats, torch.ops.carpool.int4_gemv, x, q4.packed, 32, q4.scales_zeros, block)
        t8 = timed(repeats, torch.ops.aten._weight_int8pack_mm, xb, q8.qweight, q8.scales)
        o8 = timed(repeats, torch.ops.carpool.int8_gemv, x, q8.qweight, q8.scales)
        print(
            f"| {rows} | {t4:.0f} ({t4 / rows:.0f}) | {o4:.0f} ({o4 / rows:.0f}) "
            f"| {t8:.0f} ({t8 / rows:.0f}) | {o8:.0f} ({o8 / rows:.0f}) |"
        )
    print("\n| rows | torch int8 | widen to bf16 + bf16_linear | ratio |")
    print("|---:|---:|---:|---:|")
    for rows in (8, 16, 32, 64, 128):
        xb = torch.randn(rows, k).bfloat16()
        t8 = timed(repeats, torch.ops.aten._weight_int8pack_mm, xb, q8.qweight, q8.scales)
        tw = timed(repeats, widened_int8, xb, q8)
        print(f"| {rows} | {t8:.0f} | {tw:.0f} | {tw / t8:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    assert fused_ops.load(), f"fused ops did not build: {fused_ops.failure()}"
    print(
        f"torch capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
        f"{bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}, {a.threads} threads"
    )
    with torch.inference_mode():
        bf16_table(a.repeats)
        quant_table(a.repeats)


if __name__ == "__main__":
    main()

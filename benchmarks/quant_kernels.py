"""Weight-only quantized matmul kernels on this CPU, side by side in one run.

For each weight shape ``[N, K]`` (the small random model's and SmolLM2-135M's), batch ``M`` and
thread count, times ``y = x @ W.T`` with bf16 activations:

- ``bf16``: a dequantized bf16 weight through carpool's ``Linear`` (``torch.mv`` at M=1,
  ``F.linear`` otherwise), the baseline;
- ``int8``: ``torch._weight_int8pack_mm`` (int8 weight, one bf16 scale per output channel);
- ``int4``: ``torch._weight_int4pack_mm_for_cpu`` (int4 weight packed by
  ``_convert_weight_to_int4pack_for_cpu``, a (scale, zero) pair per group of 32 inputs);
- ``int8 widened`` / ``int4 widened``: the quantized weight widened to bf16 in the call, then
  the dense bf16 GEMM (what ``Int8Linear``/``Int4Linear`` do above ``*_WIDEN_ABOVE_ROWS`` rows);
- ``int4_gemv`` / ``int8_gemv``: carpool's own kernels (``fused_ops``) over the same codes, at
  any row count (``Int4Linear`` / ``Int8Linear`` take them up to ``fused_ops.INT4_GEMV_MAX_ROWS``
  / ``INT8_GEMV_MAX_ROWS`` rows);
- ``int4 vnni`` / ``int8 vnni``: a prompt's rows on an AMX CPU (``row_paths``) as the
  forty-first pass multiplied them: the whole weight widened into ``vnni_linear``'s layout in
  the call, then its loop;
- ``int4 vnni fused`` / ``int8 vnni fused``: the same product as they take it since the
  forty-second (``vnni_linear.linear_int4`` / ``linear_int8``: each block widened into a
  thread's buffer inside the loop; the same bits).

torchao's CPU int4 weight-only layout (``Int4CPULayout``) calls the same
``_weight_int4pack_mm_for_cpu`` op, so its matmul is the ``int4`` column.

``--float32`` instead times a float32 model's matmuls: the dense float32 weight, both kernels
called with float32 activations and float32 scales (their scalar float32 paths: what carpool
did before), and ``Int8Linear``/``Int4Linear`` as they run in a float32 model now (input cast
to bf16, the bf16 kernel, output cast back).

Usage:
    python benchmarks/quant_kernels.py --threads 1,2 --batches 1,8,32,128 \
        --output benchmarks/results/quant_kernels.json
    python benchmarks/quant_kernels.py --threads 2 --batches 1,4,8,16,32,64 --shapes smol
    python benchmarks/quant_kernels.py --float32 --threads 1 --batches 1,8 \
        --output benchmarks/results/quant_kernels_fp32.json
Prints a markdown table (median microseconds per call and the weight-read GB/s) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool.model import fused_ops, vnni_linear
from carpool.model.layers import Linear
from carpool.model.quant import Int4Linear, Int8Linear, int4_row_block

SHAPES = {
    "small o_proj 512x512": (512, 512),
    "small qkv 1536x512": (1536, 512),
    "small gate_up 2816x512": (2816, 512),
    "small down 512x1408": (512, 1408),
    "small head 32000x512": (32000, 512),
    "smol o_proj 576x576": (576, 576),
    "smol qkv 960x576": (960, 576),
    "smol gate_up 3072x576": (3072, 576),
    "smol down 576x1536": (576, 1536),
    "smol head 49152x576": (49152, 576),
}


def time_calls(fns: dict[str, Callable[[], torch.Tensor]], rounds: int = 5) -> dict[str, float]:
    """Median seconds of one call of each function, interleaved round by round.

    The machine is shared: interleaving makes a burst of load hit every kernel alike, so the
    ratios stay meaningful even when the absolute times move.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (and the first-call packing, if any)
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def kernel8(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, q.qweight, q.scales)


def kernel4(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, q.group_size, q.scales_zeros)


def gemv4(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    block = int4_row_block()
    return torch.ops.carpool.int4_gemv(x, q.packed, q.group_size, q.scales_zeros, block)


def widened8(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    return torch.nn.functional.linear(x, q.qweight.to(x.dtype)) * q.scales


def widened4(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    return torch.nn.functional.linear(x, q._dense(x.dtype))


def vnni4(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    """A wide row's product (``row_paths``): widened into vnni_linear's layout in the call."""
    return vnni_linear.linear(x, q._packed_bf16(), None, q.out_features)


def vnni4_fused(x: torch.Tensor, q: Int4Linear) -> torch.Tensor:
    """The same product, each block widened into a thread's buffer (``vnni_linear.linear_int4``)."""
    return vnni_linear.linear_int4(
        x, q.packed, q.group_size, q.scales_zeros, int4_row_block(), q.out_features
    )


def vnni8_fused(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    return vnni_linear.linear_int8(x, q.qweight) * q.scales


def vnni8(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    packed = vnni_linear.pack_int8(q.qweight)
    return vnni_linear.linear(x, packed, None, q.out_features) * q.scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--batches", default="1,8,16,32")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--shapes", default="", help="only shapes whose name contains this")
    ap.add_argument("--float32", action="store_true", help="a float32 model's matmuls instead")
    args = ap.parse_args()
    if args.float32:
        float32_table(args)
        return
    torch.manual_seed(0)
    rows = []
    ours = fused_ops.load() and vnni_linear.load()  # carpool's columns where they build
    print(
        "| shape | threads | M | bf16 us | int8 us | int4 us | int8 widened us | int4 widened us |"
        + (
            " int4_gemv us | int8_gemv us | int4 vnni us | int8 vnni us |"
            " int4 vnni fused us | int8 vnni fused us |"
            if ours
            else ""
        )
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" * 6 if ours else ""))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            if args.shapes not in name:
                continue
            w = torch.randn(n, k) * 0.02
            dense = Linear(k, n, bias=False).to(torch.bfloat16)
            with torch.no_grad():
                dense.weight.copy_(w)
            q8 = Int8Linear.from_float(w)
            q4 = Int4Linear.from_float(w)
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16)
                fns = {
                    "bf16": partial(dense, x),
                    "int8": partial(kernel8, x, q8),
                    "int4": partial(kernel4, x, q4),
                    "int8 widened": partial(widened8, x, q8),
                    "int4 widened": partial(widened4, x, q4),
                }
                if ours:
                    fns["int4_gemv"] = partial(gemv4, x, q4)
                    fns["int8_gemv"] = partial(
                        torch.ops.carpool.int8_gemv, x, q8.qweight, q8.scales
                    )
                    fns["int4 vnni"] = partial(vnni4, x, q4)
                    fns["int8 vnni"] = partial(vnni8, x, q8)
                    fns["int4 vnni fused"] = partial(vnni4_fused, x, q4)
                    fns["int8 vnni fused"] = partial(vnni8_fused, x, q8)
                with torch.inference_mode():
                    t = time_calls(fns)
                rows.append(table_row(name, threads, m, t))
    write_rows(args.output, rows)


def table_row(name: str, threads: int, m: int, t: dict[str, float]) -> dict[str, object]:
    """Print one markdown row of median microseconds; return it for the JSON."""
    cells = " | ".join(f"{v * 1e6:.0f}" for v in t.values())
    print(f"| {name} | {threads} | {m} | {cells} |", flush=True)
    return {"shape": name, "threads": threads, "batch": m, "seconds": t}


def write_rows(output: Path | None, rows: list[dict[str, object]]) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


def int4_fp32(x: torch.Tensor, q: Int4Linear, scales_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, q.group_size, scales_zeros)


def float32_table(args: argparse.Namespace) -> None:
    """Median microseconds per call of a float32 model's matmuls (see the module docstring)."""
    torch.manual_seed(0)
    rows = []
    cols = ["fp32 dense", "int8 fp32 kernel", "int4 fp32 kernel", "Int8Linear", "Int4Linear"]
    print("| shape | threads | M | " + " | ".join(f"{c} us" for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.02
            q8, q4 = Int8Linear.from_float(w, None, torch.float32), Int4Linear.from_float(w)
            s8, sz4 = q8.scales.float(), q4.scales_zeros.float()  # the old float32 scales
            for m in (int(b) for b in args.batches.split(",")):
                x = torch.randn(m, k)
                with torch.inference_mode():
                    t = time_calls(
                        {
                            cols[0]: partial(torch.nn.functional.linear, x, w),
                            cols[1]: partial(torch._weight_int8pack_mm, x, q8.qweight, s8),
                            cols[2]: partial(int4_fp32, x, q4, sz4),
                            cols[3]: partial(q8, x),
                            cols[4]: partial(q4, x),
                        },
                        rounds=3,
                    )
                rows.append(table_row(name, threads, m, t))
    write_rows(args.output, rows)


if __name__ == "__main__":
    main()

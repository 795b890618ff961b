"""The AVX2 bf16 weight product (``fused_ops.cpp``'s ``bf16_linear``) and SwiGLU
(``silu_and_mul``) of two checkouts in ONE process, calls alternated.

``bf16_linear`` is the bf16 linear of a CPU without bf16 GEMM units (AVX2 only: AMD Zen 2/3),
where torch's bf16 GEMM takes its generic loops. Each checkout's ``fused_ops.cpp`` is built as
its own operator library (``ab_bf16_before::`` / ``ab_bf16_after::``), so both run on the same
weights: per row count, ``--rounds`` rounds of a pass over every layer matrix of a random
config (``--shapes``; a decode step's weights, from memory) or, with ``--op silu_and_mul``,
over every layer's SwiGLU, alternating before / after; medians, the read rate (weights, or the
SwiGLU's inputs), the product's GFLOP/s and whether both gave the same bits. On an AVX-512
machine ``--march x86-64-v3`` builds both for AVX2 (the loops an AVX2 CPU runs).

    python benchmarks/ab_bf16_linear.py --before /tmp/old/src --shapes small --rows 1,8,32
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_paged_kernel import ab_parser, alternated_medians, build_both  # noqa: E402
from vnni_linear import PRESETS, weight_shapes  # noqa: E402


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--shapes", choices=("small", "medium"), default="small")
    ap.add_argument("--rows", default="1,4,8,16,32")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--op", choices=("bf16_linear", "silu_and_mul"), default="bf16_linear")
    ap.add_argument("--march", default=None, help="build both for this -march (x86-64-v3: AVX2)")
    a = ap.parse_args()
    build_both(a, "fused_ops.cpp", "ab_bf16", a.march)
    torch.set_num_threads(a.threads)
    ops = {
        side: getattr(getattr(torch.ops, f"ab_bf16_{side}"), a.op) for side in ("before", "after")
    }
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    layers = PRESETS[a.shapes]["num_hidden_layers"]
    inter = PRESETS[a.shapes]["intermediate_size"]
    shapes = weight_shapes(a.shapes)[:-1]  # the layers, no head
    weights = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in shapes]
    nbytes = sum(w.numel() * 2 for w in weights)
    macs = sum(w.numel() for w in weights)
    print(
        f"{a.shapes}: {a.op}; {len(weights)} bf16 weights ({nbytes / 1e6:.0f} MB), x {a.dtype}; "
        f"threads={a.threads} rounds={a.rounds} march={a.march or 'native'}"
    )
    print("| rows | before ms | after ms | before / after | after GB/s | GFLOP/s | same bits |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for m in [int(r) for r in a.rows.split(",")]:
        if a.op == "bf16_linear":
            xs = {k: torch.randn(m, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
            calls = [(xs[w.shape[1]], w, None) for w in weights]
        else:  # GB/s: the SwiGLU inputs' bytes
            calls = [(torch.randn(m, 2 * inter, generator=g).to(dtype),) for _ in range(layers)]
            nbytes = sum(c[0].numel() * c[0].element_size() for c in calls)
        same = all(torch.equal(ops["before"](*c), ops["after"](*c)) for c in calls)

        def run(op, calls=calls) -> None:
            for c in calls:
                op(*c)

        med = alternated_medians({n: partial(run, op) for n, op in ops.items()}, a.rounds)
        before, after = med["before"], med["after"]
        flops = 2 * macs * m if a.op == "bf16_linear" else 0
        rate = f"{nbytes / after / 1e9:.1f} | {flops / after / 1e9:.0f}"
        print(
            f"| {m} | {before * 1e3:.3f} | {after * 1e3:.3f} | {before / after:.2f}x "
            f"| {rate} | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()

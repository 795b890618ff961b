"""The int4 weight-only product (``fused_ops.cpp``'s ``int4_gemv``) of two checkouts in ONE
process, calls alternated.

Each checkout's ``fused_ops.cpp`` is built as its own operator library (``ab_i4_before::`` and
``ab_i4_after::``: the source with its ``TORCH_LIBRARY`` namespace renamed), so both run on the
same int4 codes (``quant.Int4Linear``'s CPU layout, groups of 32): per row count, ``--rounds``
rounds of a pass over every layer matrix of a model (a decode step's reads, from memory),
alternating before / after; medians, the read rate (codes and their scales) and whether the
two outputs are the same bits. ``--shapes smollm2``: SmolLM2-135M's layers (the default
model's Q4_1 file; its head is Q8_0, so not here); ``small`` / ``medium``: the random configs';
``llama7b-layer``: one layer of a Llama-2-7B (an FFN of 11,008).

    python benchmarks/ab_int4_gemv.py --before /tmp/old/src --shapes smollm2 --rows 1,4,16
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_paged_kernel import ab_parser, alternated_medians, build_both, product_row  # noqa: E402
from vnni_linear import weight_shapes  # noqa: E402

# SmolLM2-135M-Instruct: hidden 576, intermediate 1536, 9 query / 3 kv heads of 64, 30 layers.
SMOLLM2 = [(576 + 2 * 3 * 64, 576), (576, 576), (2 * 1536, 576), (576, 1536)] * 30
# One layer of a Llama-2-7B (hidden 4096, intermediate 11008, MHA 32 heads): its down
# projection's 11,008 inputs are more codes than an L2 holds decoded.
LLAMA7B_LAYER = [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)]


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument(
        "--shapes", choices=("smollm2", "small", "medium", "llama7b-layer"), default="smollm2"
    )
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument(
        "--op",
        choices=("int4_gemv", "int4_logits"),
        default="int4_gemv",
        help="int4_logits: the float32 sums of an int4 head (x float32)",
    )
    ap.add_argument(
        "--march",
        default=None,
        help="build both for this -march instead of native (x86-64-v3: the AVX2 loops, on "
        "torch's 32-row block layout)",
    )
    ap.add_argument(
        "--huge-pages",
        action="store_true",
        help="the weights in one huge-page mapping in read order, as the engine holds them "
        "(pages.move_weights)",
    )
    a = ap.parse_args()
    from carpool.model import pages
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all, int4_row_block

    build_both(a, "fused_ops.cpp", "ab_i4", a.march)
    torch.set_num_threads(a.threads)
    # The layout the build's own loop reads: 32-row blocks for AVX2, 64 for AVX-512.
    block = 32 if a.march == "x86-64-v3" else int4_row_block()
    ops = {
        "before": getattr(torch.ops.ab_i4_before, a.op),
        "after": getattr(torch.ops.ab_i4_after, a.op),
    }
    g = torch.Generator().manual_seed(0)
    shapes = {"smollm2": SMOLLM2, "llama7b-layer": LLAMA7B_LAYER}.get(a.shapes)
    shapes = shapes or weight_shapes(a.shapes)[:-1]  # the random configs' (no head)
    lins = torch.nn.ModuleList()
    for n, k in shapes:
        lin = Int4Linear.from_float(torch.randn(n, k, generator=g) * 0.05, None, torch.float32)
        if block != int4_row_block():
            lin.packed = _pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block)
        lins.append(lin)
    if a.huge_pages:
        pages.move_weights(lins)
    weights = [(lin.packed, lin.group_size, lin.scales_zeros, lin.in_features) for lin in lins]
    nbytes = sum(p.numel() + sz.numel() * sz.element_size() for p, _, sz, _ in weights)
    dtype = getattr(torch, a.dtype)
    print(
        f"{a.shapes}: {len(shapes)} int4 weights, {nbytes / 1e6:.0f} MB with their scales; "
        f"{a.op}, x {a.dtype}; huge pages {a.huge_pages}; threads={a.threads} "
        f"rounds={a.rounds} block={block}"
    )
    print("| rows | before ms | after ms | before / after | after GB/s | same bits |")
    print("|---:|---:|---:|---:|---:|---|")
    for m in [int(r) for r in a.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
        same = all(
            torch.equal(
                ops["before"](xs[k], p, gs, sz, block), ops["after"](xs[k], p, gs, sz, block)
            )
            for p, gs, sz, k in weights
        )

        def run(op: Callable[..., torch.Tensor], xs: dict[int, torch.Tensor] = xs) -> None:
            for p, gs, sz, k in weights:
                op(xs[k], p, gs, sz, block)

        med = alternated_medians({n: partial(run, op) for n, op in ops.items()}, a.rounds)
        print(product_row(m, med, nbytes, same))


if __name__ == "__main__":
    main()

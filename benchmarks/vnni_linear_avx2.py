"""bf16 linears on an AVX2 CPU without bf16 instructions (AMD Zen 2/3), per row count, alternated
in one run: ``fused_ops.bf16_linear`` on plain ``[N, K]`` weights (what ran before the
twenty-second pass of issue 11, and what a plain weight still takes) against
``vnni_linear``'s AVX2 loops on the VNNI layout (what ``Linear.prepack`` picks there now).

Every linear weight of a random model of ``--random-config``'s shapes (the layers, and the
vocabulary head with ``--head``: a decode step's reads, from memory) is multiplied by an
``[M, K]`` bf16 input, in turn; medians of ``--rounds`` alternated rounds
(``ab_paged_kernel.alternated_medians``), GFLOP/s and whether both agree within a bf16
rounding. ``--huge-pages``: the packed weights in one huge-page arena, as the engine holds them.

    python benchmarks/vnni_linear_avx2.py --random-config small --rows 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_paged_kernel import alternated_medians  # noqa: E402
from vnni_linear import weight_shapes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-config", default="small", choices=("small", "medium"))
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--head", action="store_true", help="the vocabulary head too")
    ap.add_argument(
        "--huge-pages", action="store_true", help="packed weights as the engine holds them"
    )
    a = ap.parse_args()
    from carpool.model import fused_ops, pages, vnni_linear

    assert fused_ops.load() and vnni_linear.load(), "the kernels did not build"
    torch.set_num_threads(a.threads)
    shapes = weight_shapes(a.random_config)
    if not a.head:
        shapes = shapes[:-1]
    g = torch.Generator().manual_seed(0)
    plain = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in shapes]
    packed = torch.nn.ParameterList(
        [torch.nn.Parameter(vnni_linear.pack(w), requires_grad=False) for w in plain]
    )
    if a.huge_pages:
        pages.move_weights(packed)
        arena = pages.weight_arena(packed)
        assert arena is not None, "no huge-page arena"
        vnni_linear.stream_from_huge_pages(arena)
    macs = sum(w.numel() for w in plain)
    print(
        f"{a.random_config}: {len(plain)} bf16 weights ({2 * macs / 1e6:.0f} MB), "
        f"threads={a.threads} rounds={a.rounds} huge pages={a.huge_pages}; "
        f"bf16 emulated here: {fused_ops.bf16_emulated()}, VNNI layout picked: "
        f"{vnni_linear.available('cpu')}"
    )
    print("| rows | bf16_linear ms | vnni ms | speed-up | vnni GB/s | vnni GFLOP/s | agree |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for m in [int(r) for r in a.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in {k for _, k in shapes}}
        pairs = [(w, p, xs[w.shape[1]]) for w, p in zip(plain, packed, strict=True)]

        def run_plain(pairs=pairs) -> None:
            for w, _, x in pairs:
                torch.ops.carpool.bf16_linear(x, w, None)

        def run_vnni(pairs=pairs) -> None:
            for w, p, x in pairs:
                torch.ops.carpool.vnni_linear(x, p, None, w.shape[0], 0)

        # Both are float32 sums of the same products rounded once to bf16: one ulp apart at most.
        agree = all(
            torch.allclose(
                torch.ops.carpool.bf16_linear(x, w, None).float(),
                torch.ops.carpool.vnni_linear(x, p, None, w.shape[0], 0).float(),
                rtol=2**-7,
                atol=1e-3,
            )
            for w, p, x in pairs
        )
        med = alternated_medians({"plain": run_plain, "vnni": run_vnni}, a.rounds)
        before, after = med["plain"], med["vnni"]
        print(
            f"| {m} | {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x "
            f"| {2 * macs / after / 1e9:.1f} | {2 * macs * m / after / 1e9:.0f} "
            f"| {'yes' if agree else 'NO'} |"
        )


if __name__ == "__main__":
    main()

"""The bf16 linear kernel (``vnni_linear.cpp``) of two checkouts in ONE process, calls alternated.

Each checkout's ``vnni_linear.cpp`` is built as its own operator library (``ab_lin_before::``
and ``ab_lin_after::``: the same source with its ``TORCH_LIBRARY`` namespace renamed), so both
run side by side on the same packed weights: per row count, ``--rounds`` rounds of a pass over
every linear weight of a ``--random-config`` model (a decode step's reads, from memory),
alternating before / after; medians, and the matmul rate against the bf16 roofline probe.
``--huge-pages``: the weights in one huge-page mapping in read order, as the engine lays
them out (``pages.move_weights``), and registered as such with both builds where they take it
(``vnni_linear.stream_from_huge_pages``).

    python benchmarks/ab_vnni_linear.py --before /tmp/old/src --rows 1,8,32 --threads 2
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_paged_kernel import ab_parser, build  # noqa: E402
from vnni_linear import weight_shapes  # noqa: E402

from carpool.bench import probes  # noqa: E402
from carpool.model import pages, vnni_linear  # noqa: E402


def main() -> None:
    ap = ab_parser(__doc__, rounds=9)
    ap.add_argument("--random-config", default="medium")
    ap.add_argument("--rows", default="1,8,16,32")
    ap.add_argument("--huge-pages", action="store_true", help="weights as the engine holds them")
    a = ap.parse_args()
    build(Path(a.before), "ab_lin_before", "vnni_linear.cpp")
    build(Path(a.after), "ab_lin_after", "vnni_linear.cpp")
    torch.set_num_threads(a.threads)
    ops = {
        "before": torch.ops.ab_lin_before.vnni_linear,
        "after": torch.ops.ab_lin_after.vnni_linear,
    }
    g = torch.Generator().manual_seed(0)
    shapes = weight_shapes(a.random_config)
    weights = [
        (vnni_linear.pack((torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)), n, k)
        for n, k in shapes
    ]
    if a.huge_pages:
        holder = torch.nn.ParameterList([torch.nn.Parameter(w, False) for w, _, _ in weights])
        assert pages.move_weights(holder), "CARPOOL_WEIGHT_PAGES=0 is set"
        weights = [(p.data, n, k) for p, (_, n, k) in zip(holder, weights, strict=True)]
        arena = pages.weight_arena(holder)
        for ns in ("ab_lin_before", "ab_lin_after"):  # as prepare_model tells the engine's
            lib = getattr(torch.ops, ns)
            if hasattr(lib, "vnni_linear_huge_pages"):  # checkouts before the fourteenth pass
                lib.vnni_linear_huge_pages(arena.data_ptr(), arena.nbytes, True)
    nbytes = sum(n * k * 2 for n, k in shapes)
    peak = probes.measure_roofline(torch.bfloat16).peak_flops / 1e9  # the bench's own probe
    print(
        f"{a.random_config}: {len(shapes)} weights, {nbytes / 1e6:.0f} MB; threads={a.threads} "
        f"rounds={a.rounds}; bf16 matmul probe {peak:.0f} GFLOP/s; "
        f"{'huge pages' if a.huge_pages else '4 KiB pages'}"
    )
    print("| rows | before ms | after ms | before / after | after GFLOP/s | after % of probe |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in [int(r) for r in a.rows.split(",")]:
        xs = {
            k: torch.randn(m, k, generator=g).to(torch.bfloat16) for k in {k for _, _, k in weights}
        }
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(a.rounds + 1):
            for name, op in ops.items():
                t0 = time.perf_counter()
                for w, n, k in weights:
                    op(xs[k], w, None, n, 0)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
        before, after = (statistics.median(times[k]) for k in ("before", "after"))
        gflops = 2 * m * nbytes / 2 / after / 1e9
        print(
            f"| {m} | {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x "
            f"| {gflops:.0f} | {100 * gflops / peak:.1f}% |"
        )


if __name__ == "__main__":
    main()

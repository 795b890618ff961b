"""An int8 model's layer matrices on AMX tiles against the decode kernels, per row count.

For each row count M, every layer matrix of a random model of ``--random-config``'s shapes
(each layer's qkv, o, gate_up and down projections, int8 codes with a bf16 scale per row) is
multiplied by an ``[M, K]`` float32 input, in turn, with:
- ``decode``: what a decode step's rows take (``fused_ops.int8_gemv`` up to its rows, past them
  ``fused_ops.int8_dot``: AVX-512 BF16 dot products, one sum order at every row count);
- ``tiles``: ``vnni_linear.linear_int8`` (the codes widened to bf16 a 64-column block at a time
  and multiplied on AMX tiles: what a prompt's rows take on an AMX CPU).
Rounds alternate the two, each after a 256 MB write (the weights then come from memory, as in
a model's step); prints the medians and their ratio.

    python benchmarks/int8_tiles.py --random-config small --rows 1,4,8,16,32,64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from vnni_linear import weight_shapes

from carpool.model import fused_ops, vnni_linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--rows", default="1,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (fused_ops.load() and vnni_linear.load()):
        raise SystemExit("the fused operators did not build here")
    if not vnni_linear.amx():
        print("note: no AMX here: vnni_linear takes its matrix-vector loop, not tiles")
    torch.manual_seed(0)
    shapes = weight_shapes(args.random_config)[:-1]  # the layers, not the head
    weights = [
        (torch.randint(-127, 128, s, dtype=torch.int8), (torch.rand(s[0]) * 0.01).bfloat16())
        for s in shapes
    ]
    mb = sum(q.numel() for q, _ in weights) / 1e6
    print(
        f"{args.random_config}: {len(weights)} int8 layer matrices, {mb:.0f} MB of codes; "
        f"threads={args.threads} rounds={args.rounds}"
    )
    print("| rows | decode ms | tiles ms | decode / tiles |")
    print("|---:|---:|---:|---:|")
    evict = torch.empty(64 << 20, dtype=torch.float32)
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in {q.shape[1] for q, _ in weights}}

        def decode(xs: dict[int, torch.Tensor] = xs) -> None:
            for q, s in weights:
                x = xs[q.shape[1]]
                if fused_ops.int8_gemv(x, q, s) is None:
                    assert fused_ops.int8_dot(x, q, s) is not None, "int8_dot declined"

        def tiles(xs: dict[int, torch.Tensor] = xs) -> None:
            for q, s in weights:
                vnni_linear.linear_int8(xs[q.shape[1]], q, s)

        runs: dict[str, list[float]] = {"decode": [], "tiles": []}
        fns: list[tuple[str, Callable[[], None]]] = [("decode", decode), ("tiles", tiles)]
        for _name, fn in fns:  # untimed: first-touch allocations, kernel selection
            fn()
        for _ in range(args.rounds):
            for name, fn in fns:
                evict.add_(1.0)
                t0 = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
        d, t = (statistics.median(runs[k]) * 1e3 for k in ("decode", "tiles"))
        print(f"| {rows} | {d:.2f} | {t:.2f} | {d / t:.2f}x |")


if __name__ == "__main__":
    main()

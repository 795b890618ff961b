"""bf16 linear kernels on a model's whole set of weights, per row count, side by side in one run.

For each row count M, every linear weight of a random model of ``--random-config``'s shapes
(each layer's qkv, o, gate_up and down projections, then the vocabulary head: the reads of one
decode step) is multiplied by an ``[M, K]`` input, in turn, with:
- ``plain``: ``F.linear`` on the ``[N, K]`` weight (``torch.mv`` at one row, as ``Linear`` does);
- ``onednn``: oneDNN's linear on its packed layout (``Linear.prepack("onednn")``);
- ``vnni``: ``carpool.model.vnni_linear``'s automatic path (our AMX loop, 32 rows at a
  time; without AMX the matrix-vector kernel), and its other two paths forced: the AVX-512
  BF16 matrix-vector kernel and oneDNN's AMX micro-kernel (``brgemm``; without AMX again the
  matrix-vector kernel) over the same layout.
Prints the median time of a pass over all weights and the read rate (weight bytes / time).

    python benchmarks/vnni_linear.py --random-config small --rows 1,2,4,8,16,32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
import torch.nn.functional as F

from carpool.bench.random_model import PRESETS
from carpool.model import vnni_linear


def weight_shapes(preset: str) -> list[tuple[int, int]]:
    """The ``[N, K]`` of every linear of one decode step, in the model's order."""
    p = PRESETS[preset]
    h, i, layers = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    d = h // p["num_attention_heads"]
    qkv = h + 2 * p["num_key_value_heads"] * d
    return [(qkv, h), (h, h), (2 * i, h), (h, i)] * layers + [(p["vocab_size"], h)]


def plain_fn(w: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``Linear``'s unpacked path: ``torch.mv`` at one row, ``F.linear`` above."""
    if x.shape[0] == 1:
        return lambda: torch.mv(w, x[0])
    return lambda: F.linear(x, w)


def onednn_fn(w: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def vnni_fn(w: torch.Tensor, x: torch.Tensor, n: int, path: int) -> Callable[[], torch.Tensor]:
    return lambda: vnni_linear.linear(x, w, None, n, path)


def median_pass(fns: list[Callable[[], torch.Tensor]], repeats: int) -> float:
    for f in fns:
        f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for f in fns:
            f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-config", default="small", choices=sorted(PRESETS))
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert vnni_linear.load(), f"kernel did not build: {vnni_linear.failure()}"
    shapes = weight_shapes(args.random_config)
    torch.manual_seed(0)
    plain = [torch.randn(s, dtype=torch.bfloat16) for s in shapes]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in plain]
    vnni = [vnni_linear.pack(w) for w in plain]
    total = sum(w.numel() * w.element_size() for w in plain)
    print(
        f"{args.random_config}: {len(shapes)} weights, {total / 1e6:.1f} MB, "
        f"{args.threads} threads, automatic path on AMX: {vnni_linear.amx()}"
    )
    print(
        "| rows | plain ms | onednn ms | vnni ms | vnni GB/s | vnni speed-up vs onednn "
        "| gemv path ms | brgemm path ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in {s[1] for s in shapes}}

        t = {
            "plain": median_pass([plain_fn(w, xs[w.shape[1]]) for w in plain], args.repeats),
            "onednn": median_pass(
                [onednn_fn(w, xs[k]) for w, (_, k) in zip(onednn, shapes, strict=True)],
                args.repeats,
            ),
        }
        for name, path in (
            ("vnni", vnni_linear.PATH_AUTO),
            ("gemv", vnni_linear.PATH_GEMV),
            ("amx", vnni_linear.PATH_BRGEMM),
        ):
            fns = [vnni_fn(w, xs[k], n, path) for w, (n, k) in zip(vnni, shapes, strict=True)]
            t[name] = median_pass(fns, args.repeats)
        print(
            f"| {m} | {t['plain'] * 1e3:.2f} | {t['onednn'] * 1e3:.2f} | {t['vnni'] * 1e3:.2f} "
            f"| {total / t['vnni'] / 1e9:.1f} | {t['onednn'] / t['vnni']:.2f}x "
            f"| {t['gemv'] * 1e3:.2f} | {t['amx'] * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()

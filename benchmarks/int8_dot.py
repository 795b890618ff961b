"""int8 weight-only products of a decode batch: the candidates for ``quant.Int8Linear`` between
``int8_gemv``'s rows and a prefill's, side by side in ONE process, calls alternated.

Per row count: one pass over every layer matrix of a ``--random-config`` model (a decode
step's reads, from memory: the small model's 32 matrices are 26 MB of codes), with float32
activations as a GGUF Q8_0 model has them (each candidate with the casts the engine wraps
around it), medians of ``--rounds`` rounds:

- ``torch``: ``torch._weight_int8pack_mm`` (x cast to bf16, the bf16 result cast back);
- ``widened``: the codes widened to a bf16 copy, ``F.linear``, times the scales (what
  ``Int8Linear`` ran above ``INT8_WIDEN_ABOVE_ROWS`` rows);
- ``int8_gemv``: carpool's float32-FMA kernel (it takes any row count);
- ``int8_dot``: carpool's bf16 dot-product kernel (AVX-512 BF16 only).

    python benchmarks/int8_dot.py --random-config small --rows 9,16,32,64 --threads 2
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

from carpool.model import fused_ops  # noqa: E402
from carpool.model.quant import Int8Linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--rows", default="9,12,16,24,32,48,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    assert fused_ops.load(), "carpool's fused operators did not build"
    torch.set_num_threads(a.threads)
    ops = torch.ops.carpool
    dot = bool(ops.int8_dot_fast())
    g = torch.Generator().manual_seed(0)
    shapes = weight_shapes(a.random_config)[:-1]  # the layers (the head is int8_logits')
    layers = [Int8Linear.from_float(torch.randn(n, k, generator=g) * 0.02) for n, k in shapes]
    codes = sum(n * k for n, k in shapes)
    print(
        f"{a.random_config}: {len(shapes)} layer matrices, {codes / 1e6:.0f} MB of codes; "
        f"threads={a.threads} rounds={a.rounds}; int8_dot {'built' if dot else 'not built here'}"
    )
    names = ["torch", "widened", "int8_gemv"] + (["int8_dot"] if dot else [])
    print("| rows | " + " | ".join(f"{n} ms" for n in names) + " | best | GFLOP/s (best) |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for m in (int(r) for r in a.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for k in {k for _, k in shapes}}

        def run(kind: str, xs: dict[int, torch.Tensor] = xs) -> None:
            for q, (_, k) in zip(layers, shapes, strict=True):
                x = xs[k]
                if kind == "torch":
                    torch._weight_int8pack_mm(x.to(torch.bfloat16), q.qweight, q.scales).float()
                elif kind == "widened":
                    w = q.qweight.to(torch.bfloat16)
                    (torch.nn.functional.linear(x.to(torch.bfloat16), w) * q.scales).float()
                elif kind == "int8_gemv":
                    ops.int8_gemv(x, q.qweight, q.scales)
                else:
                    ops.int8_dot(x, q.qweight, q.scales)

        with torch.inference_mode():
            med = alternated_medians({n: (lambda n=n: run(n)) for n in names}, a.rounds)
        best = min(med, key=med.__getitem__)
        gflops = 2 * m * codes / med[best] / 1e9
        cells = " | ".join(f"{med[n] * 1e3:.2f}" for n in names)
        print(f"| {m} | {cells} | {best} | {gflops:.0f} |", flush=True)


if __name__ == "__main__":
    main()

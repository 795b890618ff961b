"""The int8 weight-only product (``fused_ops.cpp``'s ``int8_gemv``) of two checkouts in ONE
process, calls alternated.

Each checkout's ``fused_ops.cpp`` is built as its own operator library (``ab_i8_before::`` and
``ab_i8_after::``: the source with its ``TORCH_LIBRARY`` namespace renamed), so both run on the
same int8 codes: per row count, ``--rounds`` rounds of a pass over every linear weight of a
``--random-config`` model (a decode step's reads, from memory), alternating before / after;
medians, the read rate, and whether the two outputs are the same bits.

    python benchmarks/ab_int8_gemv.py --before /tmp/old/src --random-config small --rows 1,2,4

``--op int8_dot`` compares that operator instead (``int8_logits``: a float32 model's head,
``--weights head``); ``--before-op`` runs another one in the before checkout (what took those
rows there). ``--weights layers|head``: the layer matrices only, or the vocabulary head only.

``--huge-pages``: the codes in one huge-page mapping in read order, as the engine holds a
model's weights (``pages.move_weights``). ``--evict``: 256 MB read before every pass (untimed),
the weights then come from memory as in a model's step.

    python benchmarks/ab_int8_gemv.py --before /tmp/old/src --random-config smollm2 \
        --weights head --op int8_logits --rows 1,4,16 --huge-pages --evict
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_int4_gemv import SMOLLM2 as SMOLLM2_LAYERS  # noqa: E402
from ab_paged_kernel import ab_parser, alternated_medians, build, product_row  # noqa: E402
from vnni_linear import weight_shapes  # noqa: E402

from carpool.model import pages  # noqa: E402

OPS = ("int8_gemv", "int8_dot", "int8_logits")
# SmolLM2-135M-Instruct's layers and its 49,152 x 576 head (the default model's Q8_0 embedding).
SMOLLM2 = SMOLLM2_LAYERS + [(49152, 576)]


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--random-config", default="small", help="a preset, or smollm2")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--huge-pages", action="store_true", help="weights as the engine holds them")
    ap.add_argument(
        "--op",
        choices=OPS,
        default="int8_gemv",
        help="the operator of both checkouts (int8_dot: AVX-512 BF16 builds only; int8_logits: "
        "float32 x, float32 sums)",
    )
    ap.add_argument(
        "--before-op",
        choices=OPS,
        help="the before checkout's operator, if not --op's (a row count it took by another)",
    )
    ap.add_argument("--weights", choices=("all", "layers", "head"), default="all")
    ap.add_argument(
        "--evict",
        action="store_true",
        help="read 256 MB before every pass (untimed), so that the weights come from memory as "
        "in a model's step (a head alone otherwise stays partly in L3 between passes)",
    )
    a = ap.parse_args()
    build(Path(a.before), "ab_i8_before", "fused_ops.cpp")
    build(Path(a.after), "ab_i8_after", "fused_ops.cpp")
    torch.set_num_threads(a.threads)
    ops = {
        "before": getattr(torch.ops.ab_i8_before, a.before_op or a.op),
        "after": getattr(torch.ops.ab_i8_after, a.op),
    }
    g = torch.Generator().manual_seed(0)
    # The layers', then the head's; smollm2: SmolLM2-135M's (the default model's Q8_0 head).
    shapes = SMOLLM2 if a.random_config == "smollm2" else weight_shapes(a.random_config)
    shapes = {"all": shapes, "layers": shapes[:-1], "head": shapes[-1:]}[a.weights]
    weights = [
        (
            torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
            (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16),
        )
        for n, k in shapes
    ]
    if a.huge_pages:
        holder = torch.nn.ParameterList(
            [torch.nn.Parameter(t, False) for q, s in weights for t in (q, s)]
        )
        assert pages.move_weights(holder), "CARPOOL_WEIGHT_PAGES=0 is set"
        flat = [p.data for p in holder]
        weights = list(zip(flat[::2], flat[1::2], strict=True))
    nbytes = sum(n * k for n, k in shapes)
    evict = torch.ones(64 << 20, dtype=torch.int32) if a.evict else None
    dtype = getattr(torch, a.dtype)
    print(
        f"{a.random_config}: {len(shapes)} int8 weights, {nbytes / 1e6:.0f} MB; x {a.dtype}; "
        f"before {a.before_op or a.op}, after {a.op}; threads={a.threads} rounds={a.rounds}; "
        f"{'huge pages' if a.huge_pages else '4 KiB pages'}"
        f"{'; 256 MB read before each pass' if a.evict else ''}"
    )
    print("| rows | before ms | after ms | before / after | after GB/s | same bits |")
    print("|---:|---:|---:|---:|---:|---|")
    for m in [int(r) for r in a.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
        same = all(
            torch.equal(ops["before"](xs[q.shape[1]], q, s), ops["after"](xs[q.shape[1]], q, s))
            for q, s in weights
        )

        def run(op: Callable[..., torch.Tensor], xs: dict[int, torch.Tensor] = xs) -> None:
            for q, s in weights:
                op(xs[q.shape[1]], q, s)

        med = alternated_medians(
            {n: partial(run, op) for n, op in ops.items()},
            a.rounds,
            (lambda: evict.add_(1)) if evict is not None else None,
        )
        print(product_row(m, med, nbytes, same))


if __name__ == "__main__":
    main()

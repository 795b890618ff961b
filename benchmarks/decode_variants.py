"""Decode speed of the step's CPU variants, end to end, alternated in ONE engine: plain vs
packed bf16 linear weights (``layers.Linear.prepack``), torch ops vs the fused norm/activation
operators (``fused_ops``), and the VNNI layout (``vnni_linear``) where the CPU has AMX.

    OMP_NUM_THREADS=2 python benchmarks/decode_variants.py --random-config small \
        --batch-sizes 1,8,32
    OMP_NUM_THREADS=2 python benchmarks/decode_variants.py --hints 1,8,32,128 --no-fused

The engine loads the model once; every ``Linear`` keeps both its plain weight and one packed
copy per ``--hints`` value, and the variant in use is swapped before each round, so load spikes
of the shared machine hit all variants alike (rounds go ABBA...). Variants: ``plain`` (plain
weights, torch ops: the code before either change), ``packedH`` (weights packed for hint H,
torch ops) and, unless ``--no-fused``, ``packedH+fused`` for the first hint. A round is what
the peers benchmark measures (``carpool.bench.sweep.run_round``): B prompts of 32 random tokens, one
prefill step, then ``--gen-len - 1`` decode steps; decode tokens/s = sampled tokens over the
decode steps' time. Prints the median per variant and batch size, and each packed variant's
ratio to plain.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from torch import nn

from carpool import LLM
from carpool.bench.random_model import save_random_llama
from carpool.bench.sweep import run_round
from carpool.model import fused_ops, vnni_linear
from carpool.model.layers import Linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--hints", default="32", help="oneDNN batch-size hints to pack for")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds per variant and batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fused", action="store_true", help="leave out the fused-ops variant")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    hints = [int(h) for h in args.hints.split(",")]

    path = save_random_llama(
        Path(tempfile.gettempdir()) / f"carpool-variants-{args.random_config}", args.random_config
    )
    llm = LLM(
        str(path),
        dtype="bfloat16",
        max_num_seqs=max(sizes),
        max_num_batched_tokens=max(512, 32 * max(sizes)),
        max_model_len=32 + args.gen_len,
        kv_cache_memory_fraction=1.0,
        threads=args.threads,  # the engine sets torch's threads (default 1)
    )
    engine = llm.engine
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    # The runner packed them at start; rebuild the plain weight from the packed one. A
    # variant is each linear's (weight, layout) and whether the fused operators run.
    plain = [nn.Parameter(m.dense_weight(), requires_grad=False) for m in linears]
    variants: dict[str, list[tuple[nn.Parameter, str]]] = {"plain": [(w, "plain") for w in plain]}
    for h in hints:
        variants[f"packed{h}"] = [
            (
                nn.Parameter(
                    torch.ops.mkldnn._reorder_linear_weight(w.detach(), h), requires_grad=False
                ),
                "onednn",
            )
            if w.dtype == torch.bfloat16
            else (w, "plain")
            for w in plain
        ]
    fused = {n: False for n in variants}
    if not args.no_fused:
        variants[f"packed{hints[0]}+fused"] = variants[f"packed{hints[0]}"]
        fused[f"packed{hints[0]}+fused"] = True
    if vnni_linear.available("cpu"):  # what the engine runs on AVX-512 BF16 + AMX CPUs
        variants["vnni+fused"] = [
            (nn.Parameter(vnni_linear.pack(w.detach()), requires_grad=False), "vnni")
            if vnni_linear.packable(w)
            else (w, "plain")
            for w in plain
        ]
        fused["vnni+fused"] = not args.no_fused

    def use(name: str) -> None:
        for m, (w, layout) in zip(linears, variants[name], strict=True):
            m.weight, m.layout = w, layout
            m.bias_f32 = None if m.bias is None else m.bias.detach().float()
        fused_ops.use_fused(fused[name])

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def rate(batch: int) -> float:
        prompts = [[rng.randrange(3, vocab) for _ in range(32)] for _ in range(batch)]
        records = run_round(engine, prompts, args.gen_len)
        decode = records[1:]
        return sum(r.num_sampled for r in decode) / sum(r.duration for r in decode)

    names = list(variants)
    for b in sizes:  # untimed: oneDNN primitives, first touches
        for n in names:
            use(n)
            rate(b)
    speeds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in sizes} for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for b in sizes:
            for n in order:
                use(n)
                speeds[n][b].append(rate(b))
    print(
        f"{args.random_config}, bf16, {args.threads} threads, decode tokens/s, median of "
        f"{args.rounds} rounds (gen_len {args.gen_len})"
    )
    print(
        "| batch | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} / plain" for n in names[1:])
        + " |"
    )
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    med = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in speeds.items()}
    for b in sizes:
        cells = [f"{med[n][b]:.1f}" for n in names]
        ratios = [f"{med[n][b] / med['plain'][b]:.2f}x" for n in names[1:]]
        print(f"| {b} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(
                {"args": vars(args) | {"output": str(args.output)}, "tok_s": speeds}, indent=1
            )
        )


if __name__ == "__main__":
    main()

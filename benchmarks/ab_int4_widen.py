"""Prefill steps of an int4 model with its weights widened by the fused kernel or by torch ops.

Past ``quant.INT4_WIDEN_ABOVE_ROWS`` rows an ``Int4Linear`` on the CPU widens its weight to bf16
for the step's matmul (``Int4Linear._dense``): ``fused_ops.int4_widen`` in one C++ pass
("fused"), or torch's chain of whole-tensor ops ("torch"). One engine in one process, the path
switched per step, the order alternated per round; every step gets prompts of its own (the
same prompts twice would hit the prefix cache).

    python benchmarks/ab_int4_widen.py MODEL.gguf --rounds 15 --threads 2

Also times the widening alone: every ``Int4Linear`` of the model widened once, each way.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool import LLM, SamplingParams
from carpool.model import fused_ops
from carpool.model.quant import Int4Linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a GGUF file (or HF directory) with int4 weights")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=16, help="prompts per prefill step")
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args()
    tokens = args.seqs * args.prompt_len
    llm = LLM(
        args.model,
        max_num_seqs=args.seqs,
        max_num_batched_tokens=tokens,
        max_model_len=args.prompt_len + 8,
        threads=args.threads,
    )
    engine = llm.engine
    linears = [m for m in engine.model.modules() if isinstance(m, Int4Linear)]
    assert linears, f"{args.model}: no int4 linears"
    vocab = engine.model_config.vocab_size
    fused = fused_ops.int4_widen

    def use(name: str) -> None:
        fused_ops.int4_widen = fused if name == "fused" else (lambda *a: None)

    def prefill_s(seed: int) -> float:
        rnd = random.Random(seed)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for _ in range(args.seqs):
            engine.add_request([rnd.randrange(3, vocab) for _ in range(args.prompt_len)], params)
        start = time.perf_counter()
        engine.step()
        took = time.perf_counter() - start
        while engine.has_unfinished():
            engine.step()
        return took

    def widen_all_s() -> float:
        start = time.perf_counter()
        for lin in linears:
            lin._dense(torch.bfloat16)
        return time.perf_counter() - start

    steps: dict[str, list[float]] = {"torch": [], "fused": []}
    widen: dict[str, list[float]] = {"torch": [], "fused": []}
    for r in range(args.rounds + 1):  # round 0 untimed
        for name in ("fused", "torch") if r % 2 else ("torch", "fused"):
            use(name)
            t = prefill_s(1000 * r + (name == "fused"))
            w = widen_all_s()
            if r:
                steps[name].append(t)
                widen[name].append(w)
    use("fused")
    print(
        f"{tokens}-token prefill steps, {len(linears)} int4 linears, {args.threads} threads, "
        f"medians of {args.rounds} alternated rounds"
    )
    print("| path | prefill step ms | widening all int4 weights ms |")
    print("|---|---:|---:|")
    for name in ("torch", "fused"):
        step_ms = statistics.median(steps[name]) * 1e3
        widen_ms = statistics.median(widen[name]) * 1e3
        print(f"| {name} | {step_ms:.1f} | {widen_ms:.1f} |")
    ratio = statistics.median(steps["torch"]) / statistics.median(steps["fused"])
    print(f"prefill step speedup: {ratio:.2f}x")


if __name__ == "__main__":
    main()

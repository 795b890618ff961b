"""An int4 model's prompts through the engine: every row through the int4 kernels (the default)
against prompt rows through the widened weight (``CARPOOL_WIDE_INT4_PROMPTS=1``), alternated.

Two engines on the same file in one process, one made with each setting (an int4 layer reads it
when it is made: ``quant.wide_int4_prompts``). Each round, for each case, both engines run the
same request with ``max_tokens`` 1 (its prefill and first token), in turn, the order flipped
every round; printed: the median ms of each and the kernels' speed against the widened weight.

A case ``N`` is a fresh prompt of N random tokens; ``C+N`` a follow-up turn: C tokens the
engine has seen (one request run before, so its full blocks are in the prefix cache), then N
new ones.

    python benchmarks/int4_prompt_rows.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --cases 8,40,128,256,512,1024,2048,64+24,400+24,1000+40
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)

from carpool import LLM, SamplingParams
from carpool.model import quant


def _case(text: str) -> tuple[int, int]:
    cached, _, new = text.rpartition("+")
    return int(cached or 0), int(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an int4 GGUF file or HF directory")
    ap.add_argument("--quantization", default=None, help="int4 for an HF directory")
    ap.add_argument("--cases", default="8,40,128,512,64+24,400+24")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cases = [_case(c) for c in args.cases.split(",")]
    engines = {}
    before = os.environ.get(quant.ENV_WIDE_INT4_PROMPTS)
    for name, env in (("kernels", "0"), ("widened", "1")):
        os.environ[quant.ENV_WIDE_INT4_PROMPTS] = env
        engines[name] = LLM(args.model, quantization=args.quantization, threads=args.threads)
    if before is None:
        del os.environ[quant.ENV_WIDE_INT4_PROMPTS]
    else:
        os.environ[quant.ENV_WIDE_INT4_PROMPTS] = before
    for name, llm in engines.items():
        print(f"{name}: the engine's wide_from {llm.engine.runner.wide_from}")
    vocab = engines["kernels"].engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(0)
    ms: dict[tuple[str, tuple[int, int]], list[float]] = {
        (name, c): [] for name in engines for c in cases
    }
    order = list(engines)
    for _ in range(args.rounds):
        for c in cases:
            cached = [rng.randrange(vocab) for _ in range(c[0])]
            prompt = cached + [rng.randrange(vocab) for _ in range(c[1])]
            for name in order:
                if cached:
                    engines[name].generate([cached], params, use_tqdm=False)  # the last turn
                t = time.perf_counter()
                engines[name].generate([prompt], params, use_tqdm=False)
                ms[(name, c)].append((time.perf_counter() - t) * 1e3)
        order.reverse()
    print(f"{args.model}, {args.threads} threads, medians of {args.rounds}")
    print("| prompt | kernels ms | widened ms | kernels' speed |")
    print("|---|---:|---:|---:|")
    for c in cases:
        k = statistics.median(ms[("kernels", c)])
        w = statistics.median(ms[("widened", c)])
        label = f"{c[0]} cached + {c[1]} new" if c[0] else f"{c[1]} tokens"
        print(f"| {label} | {k:.1f} | {w:.1f} | {w / k:.2f}x |")


if __name__ == "__main__":
    main()

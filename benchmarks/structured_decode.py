"""Decode tokens/s with every request constrained by a JSON schema vs none, in one run.

B requests (B = 1 and 16) of the same prompt decode ``--max-tokens`` tokens each, greedy,
first unconstrained, then each under a JSON schema long enough that the grammar is still open
at the last token (so both runs generate the same number of tokens). Alternates the two
settings ``--repeats`` times and reports medians and the constrained/unconstrained ratio.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/structured_decode.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool import LLM, SamplingParams
from carpool.structured import StructuredOutputsParams

# 40 short strings: ~200+ tokens of JSON, more than max_tokens, so no request ends early.
SCHEMA = {
    "type": "array",
    "items": {"type": "string", "maxLength": 16},
    "minItems": 40,
    "maxItems": 40,
}


def _run(llm: LLM, batch: int, max_tokens: int, constrained: bool) -> float:
    so = StructuredOutputsParams.from_schema(SCHEMA, "bench") if constrained else None
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, structured_outputs=so
    )
    prompts = [f"def task_{i}():" for i in range(batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == batch * max_tokens, f"expected {batch * max_tokens} tokens, got {n}"
    return n / dt


def main() -> None:
    """Measure and print one line per batch size; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default=str(resources.files("carpool") / "data" / "default_model"),
        help="model path (default: the embedded model)",
    )
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default="benchmarks/results/structured_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, seed=0, threads=args.threads)  # the engine sets torch's threads
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        _run(llm, b, 8, False)  # warm-up (and the grammar compiler, cached from here on)
        _run(llm, b, 8, True)
        free, cons = [], []
        for _ in range(args.repeats):
            free.append(_run(llm, b, args.max_tokens, False))
            cons.append(_run(llm, b, args.max_tokens, True))
        row = {
            "batch": b,
            "unconstrained_tok_s": statistics.median(free),
            "constrained_tok_s": statistics.median(cons),
        }
        row["ratio"] = row["constrained_tok_s"] / row["unconstrained_tok_s"]
        rows.append(row)
        print(
            f"B={b:3d} unconstrained {row['unconstrained_tok_s']:8.1f} tok/s"
            f"  constrained {row['constrained_tok_s']:8.1f} tok/s"
            f"  ratio {row['ratio']:.3f}  (medians of {args.repeats}, {args.threads} thread)"
        )
    with open(args.json_out, "w") as f:
        json.dump({"model": args.model, "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

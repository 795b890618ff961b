"""Decode tokens/s with 1 vs 2 torch threads, at batch 1 and 16, on the default model.

One engine is loaded once; the thread count is switched with ``torch.set_num_threads`` between
runs, interleaved (1, 2, 1, 2, ...) so both see the same machine load; medians are printed.
``--busy N`` starts N busy-loop processes meanwhile (a competing CPU load).

    python benchmarks/threads.py --repeats 3 --busy 0
    python benchmarks/threads.py --repeats 3 --busy 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool import LLM, SamplingParams


def _spin() -> None:
    while True:
        pass


def decode_tps(llm: LLM, batch: int, gen: int) -> float:
    """Generated tokens per second of one batch (prompt of ~8 tokens each, greedy)."""
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    prompts = [f"Count to ten, then {i}:" for i in range(batch)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--busy", type=int, default=0, help="competing busy-loop processes")
    args = ap.parse_args()
    llm = LLM(model=args.model, threads=1)
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    results: dict[tuple[int, int], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for batch in (1, 16):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    decode_tps(llm, batch, 4)  # settle the thread pool at this size
                    results.setdefault((batch, threads), []).append(
                        decode_tps(llm, batch, args.gen)
                    )
    finally:
        for p in busy:
            p.kill()
    print(f"busy processes: {args.busy}; repeats: {args.repeats}; medians (tokens/s):")
    for (batch, threads), v in sorted(results.items()):
        print(f"batch {batch:2d} threads {threads}: {statistics.median(v):7.1f}  runs {v}")


if __name__ == "__main__":
    main()

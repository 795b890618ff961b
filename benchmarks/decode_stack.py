"""Decode step with the one-call decode stack against the Python layers, alternated step by
step in ONE process (``carpool.model.decode_stack``; fair on a busy machine).

    PYTHONPATH=src python benchmarks/decode_stack.py --model model.gguf --batch 1,8,32
    PYTHONPATH=src python benchmarks/decode_stack.py --random-config small --batch 1,8

Per batch size B: B sequences whose caches hold ``--context - 1`` random tokens decode one
token each per step (batch build + forward, as ``profile_step.py``); steps alternate between
the stack and the Python layers, and the first step of each path is checked to give the same
logits. Prints each path's median step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from profile_step import (
    add_model_args,
    decode_chunks,
    decode_step,
    engine_cache_dtype,
    fill_random,
    prepared_model,
)

from carpool.model import decode_stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, batch="1,8,32", steps=20)
    a = ap.parse_args()
    path, model = prepared_model(a)
    assert model.decode_plan is not None, "this model's layers do not fit the decode stack"
    dtype = next(model.parameters()).dtype
    print(f"{path}: {dtype}, {a.threads} threads, context {a.context}")
    print("| batch | stack ms | Python layers ms | ratio |\n|---:|---:|---:|---:|")
    for b in (int(x) for x in a.batch.split(",")):
        chunks = decode_chunks(b, a.context, 16)
        caches = model.allocate_kv_cache(
            2 + b * -(-a.context // 16), 16, engine_cache_dtype(model), "cpu"
        )
        fill_random(caches)

        def step(chunks=chunks, caches=caches) -> torch.Tensor:  # noqa: ANN001
            return decode_step(model, chunks, caches)

        times: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            first = {}
            for on in (True, False):
                decode_stack.use_stack(on)
                first[on] = step()
            assert torch.equal(first[True], first[False]), "the paths' logits differ"
            for i in range(2 * a.steps):
                on = i % 2 == 0
                decode_stack.use_stack(on)
                start = time.perf_counter()
                step()
                times[on].append(time.perf_counter() - start)
        decode_stack.use_stack(True)
        on, off = (statistics.median(times[k]) * 1e3 for k in (True, False))
        print(f"| {b} | {on:.2f} | {off:.2f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()

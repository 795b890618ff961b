"""A prompt chunk's attention: its rows through the paged kernel against the rectangle's SDPA calls.

Prompt rows at positions below ``paged_attention.prompt_kernel_positions`` take the in-place
paged kernel (as generated tokens do); the rest attend in the rectangle's tiles
(``batch.attention_rectangle``). For each ``--prompt`` length (one chunk from position 0, or
``--start``), the same step is built by ``build_ragged_batch`` with ``kernel_below=0`` (every
prompt row in the rectangle) and with the engine's value, and forwarded in one process,
alternated, on the engine's own model and KV cache: medians of ``--repeats``, the step's ms
each way, and the largest difference of the sampled row's logits (the two paths round
differently; the engine takes one of them for a given position, always the same).

    python benchmarks/prompt_kernel.py --model small-BF16.gguf --prompt 128,512,1024
    python benchmarks/prompt_kernel.py --model small-BF16.gguf --layout padded
    python benchmarks/prompt_kernel.py --model small-BF16.gguf --start 1536 --prompt 512 \
        --kernel-below 100000   # every row in the kernel against every row in the rectangle
"""

from __future__ import annotations

import argparse
import random

import checkout  # noqa: F401  (this checkout's src first on sys.path)
from alternated import forward_alternated

from carpool import LLM
from carpool.scheduling.output import ScheduledChunk
from carpool.worker import batch
from carpool.worker.padded import build_padded_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--prompt", default="128,512,1024", help="comma-separated chunk lengths")
    ap.add_argument("--start", type=int, default=0, help="the chunk's first position")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--layout", choices=("ragged", "padded"), default="ragged")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--kernel-below",
        type=int,
        default=None,
        help="the kernel side's rows below this position (default: the engine's own rule); "
        "a large number gives every prompt row to the kernel",
    )
    args = ap.parse_args()
    lengths = [int(n) for n in args.prompt.split(",")]
    longest = args.start + max(lengths)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=1,
        max_model_len=longest,
        max_num_batched_tokens=max(lengths),
        kv_cache_memory_fraction=1.0,
        threads=args.threads,
        layout=args.layout,
    )
    runner = llm.engine.runner
    below = runner.kernel_below if args.kernel_below is None else args.kernel_below
    bs = runner.block_size
    table = list(range(-(-longest // bs)))
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    print(
        f"{args.model}: kernel rows below position {below} (cache {runner.kv_caches[0].dtype}), "
        f"chunks from {args.start}, {args.threads} threads, medians of {args.repeats}"
    )
    print("| prompt rows | rectangle ms | kernel below ms | ratio | largest logit difference |")
    print("|---:|---:|---:|---:|---:|")
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        chunk = ScheduledChunk("p", ids, args.start, [], 0, needs_sample=True)
        if args.layout == "padded":
            inputs = {
                k: build_padded_batch(
                    [chunk], [table], bs, runner.scratch_block, 0, "cpu", [args.start + n], kb
                )
                for k, kb in (("rectangle", 0), ("kernel", below))
            }
        else:
            inputs = {
                k: batch.build_ragged_batch([chunk], [table], bs, "cpu", [args.start + n], None, kb)
                for k, kb in (("rectangle", 0), ("kernel", below))
            }
        med, logits = forward_alternated(runner, inputs, args.repeats)
        diff = (logits["rectangle"].float() - logits["kernel"].float()).abs().max().item()
        ratio = med["rectangle"] / med["kernel"]
        print(f"| {n} | {med['rectangle']:.1f} | {med['kernel']:.1f} | {ratio:.2f}x | {diff:.2g} |")


if __name__ == "__main__":
    main()

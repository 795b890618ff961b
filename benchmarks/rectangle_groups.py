"""A step of prompt chunks over other tiles: one attention rectangle against ``rectangle_groups``'.

A batch of long prompts prefilled under a token budget (``max_num_batched_tokens``) gives steps
like this one: a decoding sequence's token, a prompt's last ``--tail`` tokens at position
``--tail-at``, and the next prompt's first ``--new`` tokens. The same step is built twice by
``build_ragged_batch``: with every prompt chunk in one rectangle (what the builder did before
``batch.rectangle_groups``) and with the groups it picks. Both are forwarded in one process,
alternated, on the engine's own model and KV cache; medians of ``--repeats``, and whether the
logits are the same bits (they must be: a row's attention calls follow from its positions).

    python benchmarks/rectangle_groups.py --model small-BF16.gguf --tail 2 --tail-at 510 --new 507
"""

from __future__ import annotations

import argparse
import random

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import numpy as np
import torch
from alternated import forward_alternated

from carpool import LLM
from carpool.scheduling.output import ScheduledChunk
from carpool.worker import batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--tail", type=int, default=2, help="the first prompt's last tokens")
    ap.add_argument("--tail-at", type=int, default=510, help="their first position")
    ap.add_argument("--new", type=int, default=507, help="the next prompt's first tokens")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    context = args.tail_at + args.tail + 1
    llm = LLM(
        args.model,
        max_num_seqs=4,
        max_model_len=max(context, args.new),
        kv_cache_memory_fraction=1.0,
        threads=args.threads,
    )
    runner = llm.engine.runner
    bs = runner.block_size
    blocks = -(-context // bs)
    tables = [
        list(range(1, 1 + blocks)),
        list(range(1 + blocks, 1 + 2 * blocks)),
        list(range(1 + 2 * blocks, 1 + 2 * blocks + -(-args.new // bs))),
    ]
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    chunks = [
        ScheduledChunk("decoding", [rng.randrange(vocab)], context - 1, [], 0, True),
        ScheduledChunk(
            "tail", [rng.randrange(vocab) for _ in range(args.tail)], args.tail_at, [], 0, True
        ),
        ScheduledChunk("new", [rng.randrange(vocab) for _ in range(args.new)], 0, [], 0, False),
    ]
    prompt_lens = [context - 1, args.tail_at + args.tail, args.new]
    grouped = batch.rectangle_groups

    def build(one: bool) -> batch.ModelInput:
        batch.rectangle_groups = (lambda q, s: [np.arange(len(q))]) if one else grouped
        try:
            return batch.build_ragged_batch(chunks, tables, bs, "cpu", prompt_lens)
        finally:
            batch.rectangle_groups = grouped

    inputs = {"one rectangle": build(True), "grouped": build(False)}
    med, logits = forward_alternated(runner, inputs, args.repeats)
    parts = {k: len(v.meta.parts or [v.meta]) for k, v in inputs.items()}
    print(
        f"{args.model}: decode row at {context - 1}, {args.tail} tokens at {args.tail_at}, "
        f"{args.new} new; {args.threads} threads, medians of {args.repeats}"
    )
    for k in inputs:
        print(f"  {k}: {parts[k]} rectangle(s), {med[k]:.1f} ms")
    same = torch.equal(logits["one rectangle"], logits["grouped"])
    print(f"  ratio {med['one rectangle'] / med['grouped']:.2f}x, same logits: {same}")


if __name__ == "__main__":
    main()

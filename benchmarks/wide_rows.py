"""A quantized model's prompt steps with its prompt rows widened from each of several positions.

A prompt row at a position of at least ``wide_from`` takes the quantized linears' weight widened
to bf16 and multiplied on AMX tiles (``carpool.model.row_paths``); the other rows read the int4 /
int8 codes in the kernels. For each ``--prompt`` length, ``--batch`` prompts of it from position
0 are built by ``build_ragged_batch`` with each ``--wide-from`` (``off``: no wide rows; the
first one the baseline) and forwarded in one process, alternated, on the engine's own model and
KV cache: the step's median ms and its speed against the first.

``--whole-matrix`` adds, for each cutoff but off, the same step with the wide rows' products as
the forty-first pass made them (each quantized matrix widened whole into memory once a step,
then ``vnni_linear.linear``; the same bits), against each block widened into a thread's
buffer inside the loop (``vnni_linear.linear_int4`` / ``_int8``, since the forty-second).

    python benchmarks/wide_rows.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt 20,32,40,48,64,128,512 --wide-from off,0,1,16,32
    python benchmarks/wide_rows.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt 2,8,16,32,128,512 --wide-from off,0 --whole-matrix
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Iterator

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from alternated import forward_alternated

from carpool import LLM
from carpool.model import layers, quant, vnni_linear
from carpool.scheduling.output import ScheduledChunk
from carpool.worker import batch


@contextlib.contextmanager
def whole_matrix() -> Iterator[None]:
    """The wide rows' products as the forty-first pass made them: the quantized matrix widened
    whole into vnni_linear's layout (once per ``layers.widen_once`` block), then its loop, with
    the casts to and from bf16 around it (a float32 model's)."""

    def int4(self: quant.Int4Linear, xk, out):  # noqa: ANN001, ANN202
        packed = layers.widened(self, torch.bfloat16, self._packed_bf16, layout="vnni")
        y = vnni_linear.linear(xk.to(torch.bfloat16), packed, None, self.out_features)
        return finish(y.to(xk.dtype), out)

    def int8(self: quant.Int8Linear, xk, out):  # noqa: ANN001, ANN202
        packed = layers.widened(
            self, torch.bfloat16, lambda: vnni_linear.pack_int8(self.qweight), layout="vnni"
        )
        y = vnni_linear.linear(xk.to(torch.bfloat16), packed, None, self.out_features)
        return finish((y * self.scales).to(xk.dtype), out)

    def finish(y, out):  # noqa: ANN001, ANN202
        return y if out is None else out.copy_(y)

    saved = quant.Int4Linear._vnni_product, quant.Int8Linear._vnni_product
    quant.Int4Linear._vnni_product, quant.Int8Linear._vnni_product = int4, int8
    try:
        yield
    finally:
        quant.Int4Linear._vnni_product, quant.Int8Linear._vnni_product = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a quantized GGUF file or HF directory")
    ap.add_argument("--prompt", default="20,32,40,64,128,512", help="comma-separated lengths")
    ap.add_argument(
        "--wide-from", default="off,0,1,16", help="comma-separated; off: none; the first: baseline"
    )
    ap.add_argument("--batch", type=int, default=1, help="prompts of each length in the step")
    ap.add_argument("--quantization", default=None, help="int8 / int4 for an HF directory")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--whole-matrix", action="store_true", help="also each cutoff with whole widened matrices"
    )
    args = ap.parse_args()
    # Every cutoff's wide rows through an int4 layer's widened weight too (by default int4
    # layers take the kernels for every row: quant.WIDE_INT4_PROMPTS), so "off" is the default
    # engine's path for an int4 model.
    quant.WIDE_INT4_PROMPTS = True
    lengths = [int(n) for n in args.prompt.split(",")]
    froms = [None if w == "off" else int(w) for w in args.wide_from.split(",")]
    longest = max(lengths)
    llm = LLM(
        args.model,
        quantization=args.quantization,
        max_num_seqs=args.batch,
        max_model_len=longest,
        max_num_batched_tokens=longest * args.batch,
        kv_cache_memory_fraction=1.0,
        threads=args.threads,
    )
    runner = llm.engine.runner
    bs = runner.block_size
    per_seq = -(-longest // bs)
    tables = [list(range(k * per_seq, (k + 1) * per_seq)) for k in range(args.batch)]
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    print(
        f"{args.model}: {args.batch} prompt(s) a step, kernel rows below {runner.kernel_below}, "
        f"the engine's wide_from {runner.wide_from}, {args.threads} threads, medians of "
        f"{args.repeats}"
    )
    names = ["off" if w is None else str(w) for w in froms]
    if args.whole_matrix:
        names += [f"{w} whole" for w in names if w != "off"]
    print("| prompt tokens | " + " | ".join(f"from {w} ms" for w in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for n in lengths:
        chunks = [
            ScheduledChunk(f"p{k}", [rng.randrange(vocab) for _ in range(n)], 0, [], 0, True)
            for k in range(args.batch)
        ]
        inputs = {
            name: batch.build_ragged_batch(
                chunks,
                tables,
                bs,
                "cpu",
                [n] * args.batch,
                None,
                runner.kernel_below,
                wide_from=w,
            )
            for name, w in zip(names, froms, strict=False)
        }
        for name in names[len(froms) :]:
            inputs[name] = inputs[name.split()[0]]
        around = {name: whole_matrix for name in names[len(froms) :]}
        med, _ = forward_alternated(runner, inputs, args.repeats, around)
        base = med[names[0]]
        cells = [f"{med[w]:.1f} ({base / med[w]:.2f}x)" for w in names]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

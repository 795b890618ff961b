"""The block allocator (``carpool.model.cpu_allocator``) against torch's own, side by side.

Speed: one engine with the peers' settings (``py_peer.carpool_llm``: prefill in 512-token
steps, the KV cache sized for every sequence), rounds of B prompts of 32 tokens and 64 new
tokens each, the allocator's block path switched on and off round by round
(``set_min_bytes``): decode tokens/s and the prefill steps' time (steps of 256 tokens or more),
medians, and the medians of the paired rounds' ratios.

Memory: ``--processes N`` also runs ``py_peer.py`` (the peers' own rounds) N times each way,
alternated, with ``CARPOOL_CPU_ALLOCATOR`` 1 and 0: each process's peak resident memory
(``VmHWM``, as ``benchmarks/peers/run.py`` reads it).

    python benchmarks/ab_cpu_allocator.py MODEL.gguf --batch-sizes 16,32 --rounds 20 \\
        --processes 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from py_peer import carpool_llm  # noqa: E402  (benchmarks/peers is not a package)
from run import run_measured  # noqa: E402

from carpool.bench.sweep import run_round  # noqa: E402
from carpool.model import cpu_allocator  # noqa: E402

OFF = 1 << 62  # set_min_bytes: every new request to torch's allocator


def speed(args: argparse.Namespace) -> None:
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = carpool_llm(args.model, sizes, args.prompt_len, args.gen_len, args.threads)
    assert cpu_allocator.installed(), "the engine did not install the block allocator"
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    on_bytes = cpu_allocator.min_bytes()
    print(f"{args.threads} threads; medians of {args.rounds} rounds each way, alternated")
    print("| batch | allocator | decode tok/s | prefill ms | paired decode | paired prefill |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in sizes:
        got: dict[bool, dict[str, list[float]]] = {
            on: {"decode": [], "prefill": []} for on in (True, False)
        }
        for r in range(2 * args.rounds + 2):  # the first two rounds untimed
            on = r % 2 == (r // 2) % 2  # on/off, then off/on: neither always goes first
            cpu_allocator.set_min_bytes(on_bytes if on else OFF)
            rnd = random.Random(1000 * batch + r)  # fresh prompts: no prefix-cache hits
            prompts = [
                [rnd.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(batch)
            ]
            records = run_round(engine, prompts, args.gen_len)
            if r < 2:
                continue
            decode = [x for i, x in enumerate(records) if i > 0 and x.num_tokens == x.num_seqs]
            got[on]["decode"].append(
                sum(x.num_sampled for x in decode) / sum(x.duration for x in decode)
            )
            got[on]["prefill"].append(1e3 * sum(x.duration for x in records if x.num_tokens >= 256))
        cpu_allocator.set_min_bytes(on_bytes)
        pair_dec = statistics.median(
            a / b for a, b in zip(got[True]["decode"], got[False]["decode"], strict=True)
        )
        pre_on, pre_off = got[True]["prefill"], got[False]["prefill"]
        pair_pre = (
            statistics.median(b / a for a, b in zip(pre_on, pre_off, strict=True))
            if all(pre_on)
            else float("nan")  # no step of 256 tokens at this batch size
        )
        for on in (True, False):
            name = "blocks" if on else "torch"
            dec = statistics.median(got[on]["decode"])
            pre = statistics.median(got[on]["prefill"])
            pairs = f"{pair_dec:.3f} | {pair_pre:.3f}" if on else " | "
            print(f"| {batch} | {name} | {dec:.1f} | {pre:.1f} | {pairs} |")


def memory(args: argparse.Namespace) -> None:
    cmd = [sys.executable, str(HERE / "peers" / "py_peer.py"), "carpool", args.model]
    cmd += ["--batch-sizes", args.peak_batch_sizes, "--repeats", str(args.peak_repeats)]
    cmd += ["--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len)]
    cmd += ["--threads", str(args.threads)]
    peaks: dict[str, list[float]] = {"1": [], "0": []}
    for i in range(args.processes):
        for switch in ("1", "0") if i % 2 == 0 else ("0", "1"):
            env = {**os.environ, cpu_allocator.ENV_ALLOCATOR: switch}
            _, peak = run_measured(cmd, env, merge_stderr=True)
            peaks[switch].append(peak)
    print(f"\npeak resident memory of `py_peer.py` ({args.peak_batch_sizes}), MiB, alternated:")
    for switch, name in (("1", "blocks"), ("0", "torch")):
        runs = " / ".join(f"{p:.1f}" for p in peaks[switch])
        print(f"- {name}: median {statistics.median(peaks[switch]):.1f} ({runs})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a GGUF file or HF directory")
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds each way per size")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=0, help="peak-memory processes each way")
    ap.add_argument("--peak-batch-sizes", default="1,16,32")
    ap.add_argument("--peak-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.rounds:
        speed(args)
    if args.processes:
        memory(args)


if __name__ == "__main__":
    main()

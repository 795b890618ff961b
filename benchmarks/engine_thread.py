"""Which thread loads an engine and which steps it: offline decode throughput and context switches.

Three arrangements of the same ``LLM.generate`` (32 prompts of 64 random tokens, 128 tokens each,
greedy, EOS ignored, ``max_num_seqs`` 16), each in a fresh process:

* ``main``: loaded and stepped on the main thread (``LLM`` in a script);
* ``second``: loaded on the main thread, stepped on a second thread (``AsyncEngine`` behind
  ``carpool serve`` until the forty-fifth pass of issue 11);
* ``own``: loaded in ``run_in_own_thread`` (a thread that ends), stepped on a second thread
  (``carpool serve`` since).

OpenMP (libgomp) keeps a pool of workers for each thread that opened a parallel region while
that thread lives; with more pool threads than cores its workers spin ~1,000 times instead of
~300,000 at a barrier before sleeping on a futex, so ``second`` shows as many context switches
as parallel regions.

::

    python benchmarks/engine_thread.py --threads 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import checkout  # noqa: F401  (this checkout's carpool first)

ARRANGEMENTS = ("main", "second", "own")


def _switches() -> int:
    """Voluntary and involuntary context switches of every thread of this process so far."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[-1])
    return total


def child(arrangement: str, threads: int, model: str | None) -> None:
    """One arrangement in this process; prints one JSON line."""
    from carpool import LLM, SamplingParams
    from carpool.engine.threads import run_in_own_thread

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(64)] for _ in range(32)]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)

    def load() -> LLM:
        llm = LLM(model, threads=threads, max_num_seqs=16)
        llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0))  # warm-up
        return llm

    result: dict = {"arrangement": arrangement, "threads": threads}

    def step(llm: LLM) -> None:
        before = _switches()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result.update(seconds=seconds, tokens_per_s=tokens / seconds)
        result["context_switches"] = _switches() - before

    if arrangement == "main":
        step(load())
    else:
        llm = load() if arrangement == "second" else run_in_own_thread(load)
        thread = threading.Thread(target=step, args=(llm,), name="engine")
        thread.start()
        thread.join()
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="default: carpool's default model")
    p.add_argument("--child", choices=ARRANGEMENTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.threads, args.model)
        return
    runs: dict[str, list[dict]] = {a: [] for a in ARRANGEMENTS}
    for r in range(args.rounds):
        for a in ARRANGEMENTS:
            cmd = [sys.executable, __file__, "--child", a, "--threads", str(args.threads)]
            if args.model:
                cmd += ["--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[a].append(res)
            print(
                f"round {r + 1} {a}: {res['seconds']:.2f} s, {res['tokens_per_s']:.0f} tokens/s,"
                f" {res['context_switches']} context switches",
                flush=True,
            )
    for a, rs in runs.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        cs = statistics.median(x["context_switches"] for x in rs)
        print(f"{a}: median {tps:.0f} tokens/s, {cs:.0f} context switches")


if __name__ == "__main__":
    main()

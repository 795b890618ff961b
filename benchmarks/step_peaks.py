"""Which engine step sets a process's peak resident memory: each step's own peak, in the peers'
sequence of rounds.

``benchmarks/peers/`` reports a whole process's peak (``VmHWM``). Here the kernel's peak is reset
before every step (``/proc/self/clear_refs``, value 5, Linux 4.0+), so each step's peak is read
alone, beside the resident size before and after it. The rounds are ``py_peer.py``'s: each batch
size once, then ``--repeats`` times round the batch sizes; B prompts of ``--prompt-len`` random
tokens added at once, ``--gen-len`` tokens each, prefill in steps of at most 512 tokens, the KV
cache sized for every sequence at full length (``kv_cache_memory_fraction=1``).

    python benchmarks/step_peaks.py MODEL.gguf --batch-sizes 1,16,32 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)

from carpool import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from py_peer import carpool_llm  # noqa: E402  (benchmarks/peers is not a package)

CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mib() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {
            k: int(v.split()[0]) / 1024
            for k, v in (line.split(":", 1) for line in f)
            if k in ("VmRSS", "VmHWM")
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch-sizes", default="1,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10, help="steps listed, highest peak first")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = carpool_llm(args.model, sizes, args.prompt_len, args.gen_len, args.threads)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    loaded = _status_mib()
    print(f"loaded: resident {loaded['VmRSS']:.1f} MiB, peak so far {loaded['VmHWM']:.1f} MiB")
    params = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    steps = []
    for n, batch in enumerate(sizes * (args.repeats + 1)):
        rnd = random.Random(n)
        for _ in range(batch):
            engine.add_request([rnd.randrange(3, vocab) for _ in range(args.prompt_len)], params)
        i = 0
        while engine.has_unfinished():
            before = _status_mib()["VmRSS"]
            CLEAR_REFS.write_text("5")  # the peak restarts from the resident size now
            engine.step()
            after = _status_mib()
            tokens = engine.stats.records[-1].num_tokens
            steps.append((after["VmHWM"], n, batch, i, tokens, before, after["VmRSS"]))
            i += 1
    steps.sort(reverse=True)
    print("| step peak MiB | round | batch | step | tokens | resident before | after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for peak, n, batch, i, tokens, before, after in steps[: args.top]:
        print(f"| {peak:.1f} | {n} | {batch} | {i} | {tokens} | {before:.1f} | {after:.1f} |")


if __name__ == "__main__":
    main()

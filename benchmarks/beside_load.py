"""Two checkouts' prompt and decode speed with other processes busy on the same cores.

A machine that serves is rarely idle: another process (a tokenizer, a second replica, a
build) takes a core now and then, and a kernel whose threads split their work in fixed
shares then waits at every region's end for the thread that lost its core. This runs the
default model (or ``--model``) in a fresh process per measurement, the ``--before``
checkout's ``src`` and this one's in turn (alternating which goes first), while ``--busy``
single-threaded Python loops spin beside it the whole time (0: a quiet machine, the
control). Each measurement: prompts of each ``--prompt-lens`` length (``max_tokens`` 1,
median of ``--repeats`` after a warm-up that writes the KV cache over) and a decode of
``--decode-batch`` sequences of 32-token prompts, 64 new tokens each (EOS ignored), tokens/s
over the call. Reports the medians of ``--pairs`` pairs and this / before.

    python benchmarks/beside_load.py --before /tmp/old/src --busy 1 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

CHILD = r"""
import json, random, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from carpool import LLM, SamplingParams
from carpool.model.source import default_model_path
model, lens = sys.argv[2], [int(n) for n in sys.argv[3].split(",") if n]
batch, repeats, threads = (int(x) for x in sys.argv[4:7])
llm = LLM(model or str(default_model_path()), max_model_len=max(lens + [128]) + 16,
          threads=threads, kv_cache_memory=512 << 20)
rng = random.Random(0)
V = llm.engine.model_config.vocab_size
def tokens(n):
    return [rng.randrange(100, V) for _ in range(n)]
def timed(prompts, sp):
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t
one = SamplingParams(max_tokens=1, temperature=0.0)
for _ in range(2):  # the cache written over: no first touch timed
    for n in lens: timed([tokens(n)], one)
out = {}
for n in lens:
    out[f"prompt {n}"] = n / statistics.median(timed([tokens(n)], one) for _ in range(repeats))
if batch:
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    timed([tokens(32) for _ in range(batch)], sp)
    t = statistics.median(timed([tokens(32) for _ in range(batch)], sp) for _ in range(repeats))
    out[f"decode x{batch}"] = batch * 64 / t
print("RESULT " + json.dumps(out))
"""


def measure(src: Path, a: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    args = [a.model or "", a.prompt_lens, str(a.decode_batch), str(a.repeats), str(a.threads)]
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{src}: the measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the other checkout's src directory")
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (the default model)")
    ap.add_argument("--busy", type=int, default=1, help="busy single-threaded processes beside")
    ap.add_argument("--prompt-lens", default="512,2048")
    ap.add_argument("--decode-batch", type=int, default=16, help="0: no decode measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sides = {"before": Path(a.before).resolve(), "this": SRC}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    try:
        for p in range(a.pairs):
            for name in list(sides)[:: 1 if p % 2 == 0 else -1]:
                runs[name].append(measure(sides[name], a))
                print(f"pair {p + 1} {name}: {runs[name][-1]}", flush=True)
    finally:
        for b in busy:
            b.kill()
    print(
        f"\nthreads={a.threads} busy={a.busy} pairs={a.pairs} repeats={a.repeats} "
        f"model={a.model or 'default'}"
    )
    print("| measure | before tokens/s | this tokens/s | this / before |")
    print("|---|---:|---:|---:|")
    for key in runs["this"][0]:
        med = {k: statistics.median(r[key] for r in runs[k]) for k in sides}
        ratio = med["this"] / med["before"]
        print(f"| {key} | {med['before']:.0f} | {med['this']:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

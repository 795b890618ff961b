"""Does a step's cost outside the forward pass grow with the sequence? One long stream, per tree.

For each source tree (``--tree LABEL=SRC``, run in its own subprocess) one request streams
``--tokens`` tokens (greedy, EOS ignored, DELTA outputs) on the tiny random Llama (context
8192, float32, 1 thread); every engine step is timed by part (``thread_time``: schedule,
execute, update, detokenize, outputs) and two deterministic counts are taken per step: token ids
the detokenizer decodes and block ids handed from the scheduler to the runner. The medians of
the first and the last 100 steps are printed side by side: a part whose cost grows with the
sequence shows a larger last column. The counts do not depend on the machine's load; the times
do (the first and last steps run at different moments).

Usage:
    python benchmarks/step_growth.py --tree main=/work/main/src --tree core=src --tokens 4000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)

CHILD = r"""
import json, statistics, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from carpool.bench.random_model import save_random_llama
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.sampling_params import RequestOutputKind, SamplingParams
work, n = Path(sys.argv[1]), int(sys.argv[2])
if not (work / "tiny" / "config.json").is_file():
    t = save_random_llama(work / "tiny", "tiny", "float32")
    c = json.loads((t / "config.json").read_text()); c["max_position_embeddings"] = 8192
    (t / "config.json").write_text(json.dumps(c))
eng = LLMEngine(EngineConfig(model=str(work / "tiny"), dtype="float32", kv_cache_memory=64 << 20))
times, counts = {}, {"decoded ids": [0], "block ids handed": [0]}
def timed(obj, name, key):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.thread_time_ns()
        try:
            return f(*a, **k)
        finally:
            times.setdefault(key, []).append(time.thread_time_ns() - t)
    setattr(obj, name, g)
for obj, name, key in ((eng.policy, "schedule", "schedule"), (eng.runner, "execute", "execute"),
                       (eng.policy, "update_from_output", "update"),
                       (eng.output_processor, "add_tokens", "detokenize"),
                       (eng.output_processor, "outputs", "outputs"), (eng, "run_step", "step")):
    timed(obj, name, key)
decode = type(eng.tokenizer).decode
def counting_decode(self, ids, *a, **k):
    counts["decoded ids"][-1] += len(ids)
    return decode(self, ids, *a, **k)
type(eng.tokenizer).decode = counting_decode
schedule = eng.policy.schedule
def counting_schedule(now):
    out = schedule(now)
    for c in out.chunks:  # before issue 10's deltas a chunk carried its whole table
        ids = getattr(c, "new_block_ids", None)
        counts["block ids handed"][-1] += len(ids if ids is not None else c.block_table)
    return out
eng.policy.schedule = counting_schedule
params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                        output_kind=RequestOutputKind.DELTA)
eng.add_request([1, 2, 3, 4, 5], params)
while eng.has_unfinished():
    eng.step()
    for v in counts.values():
        v.append(0)
res = {}
times["outside execute"] = [s - e for s, e in zip(times["step"], times["execute"])]
for k, v in times.items():
    res[k + " (us)"] = (statistics.median(v[5:105]) / 1e3, statistics.median(v[-100:]) / 1e3)
for k, v in counts.items():
    v = v[:-1]
    res[k + " per step"] = (sum(v[5:105]) / 100, sum(v[-100:]) / 100)
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=SRC_DIR (repeatable)")
    ap.add_argument("--tokens", type=int, default=4000, help="tokens streamed")
    ap.add_argument("--output", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="step-growth-")
    results = {}
    for label, src in (t.split("=", 1) for t in args.tree):
        env = os.environ | {"PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, work, str(args.tokens)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| per step (first 100 / last 100 of {args.tokens}) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for key in next(iter(results.values())):
        cells = " | ".join(f"{r[key][0]:.1f} / {r[key][1]:.1f}" for r in results.values())
        print(f"| {key} | {cells} |")
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Decode tokens/s of two carpool checkouts and ``transformers``, interleaved in one run.

One long-lived worker process per system (each loads the model once); the orchestrator asks
them in turn for one measurement at a time, cycling over batch sizes and repeats, so slow and
fast moments of a shared machine fall on every system alike. Medians per cell.

    python benchmarks/decode_compare.py --before /work/main/src --after src \\
        --batch-sizes 1,4,8,16,32,64 --repeats 3

Decode tokens/s: carpool, ``B / median decode-step time`` from the engine's step records;
transformers, ``B x (gen - 1) / (time(gen tokens) - time(1 token))``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 32


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]


def worker(kind: str, path: str, dtype: str, gen: int, threads: int) -> None:
    """Serve measurements: read a batch size per stdin line, answer decode tokens/s."""
    import torch

    torch.set_num_threads(threads)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    if kind == "hf":
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype)
        ).eval()

        def run(b: int) -> float:
            ids = torch.tensor(_prompts(b, vocab))
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                start = time.perf_counter()
                hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                hf.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kw)
                total = time.perf_counter() - start
            return b * (gen - 1) / max(total - prefill, 1e-9)
    else:
        from carpool import LLM, SamplingParams

        llm = LLM(
            path,
            dtype=dtype,
            max_num_seqs=64,
            max_num_batched_tokens=64 * PROMPT_LEN,
            kv_cache_memory=512 * 2**20,
            threads=threads,  # the engine sets torch's threads itself (default 1)
        )

        def run(b: int) -> float:
            params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
            llm.generate(_prompts(b, vocab), params, use_tqdm=False)
            records = list(llm.engine.stats.records)[-(gen - 1) :]
            steps = [r.duration for r in records if r.num_seqs == b]
            return b / statistics.median(steps)

    run(2)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run(int(line))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--before", default="/work/main/src", help="src dir of the 'before' checkout")
    ap.add_argument("--after", default="src", help="src dir of the 'after' checkout")
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--output", default="decode_compare.json")
    a = ap.parse_args()
    model = Path(tempfile.gettempdir()) / "carpool-profile-models" / f"{a.random_config}-{a.dtype}"
    if a.worker:
        worker(a.worker, str(model), a.dtype, a.gen_len, a.threads)
        return
    sys.path.insert(0, str(Path(a.after).resolve()))
    if not (model / "model.safetensors").is_file():
        from carpool.bench.random_model import save_random_llama

        save_random_llama(model, preset=a.random_config, dtype=a.dtype)
    systems = {"before": a.before, "after": a.after} | ({} if a.no_hf else {"hf": a.after})
    procs = {}
    for name, src in systems.items():
        env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS=str(a.threads))
        kind = "hf" if name == "hf" else "carpool"
        cmd = [sys.executable, __file__, "--worker", kind, "--random-config", a.random_config]
        cmd += ["--dtype", a.dtype, "--gen-len", str(a.gen_len), "--threads", str(a.threads)]
        procs[name] = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    for p in procs.values():
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    results: dict[str, dict[int, list[float]]] = {n: {b: [] for b in sizes} for n in procs}
    for rep in range(a.repeats):
        for b in sizes:
            # Alternate who goes first, so neither system always follows the other.
            order = list(procs) if (rep + b) % 2 == 0 else list(reversed(procs))
            for name in order:
                p = procs[name]
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(f"{b}\n")
                p.stdin.flush()
                results[name][b].append(json.loads(p.stdout.readline()))
            cells = {n: round(results[n][b][-1], 1) for n in procs}
            print(f"repeat {rep} batch {b}: {cells}", file=sys.stderr, flush=True)
            Path(a.output).write_text(json.dumps(results, indent=2))
    for p in procs.values():
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
    names = list(procs)
    print("| batch | " + " | ".join(names) + " | after / before |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for b in sizes:
        med = {n: statistics.median(results[n][b]) for n in names}
        cells = " | ".join(f"{med[n]:.0f}" for n in names)
        print(f"| {b} | {cells} | {med['after'] / med['before']:.2f}x |")


if __name__ == "__main__":
    main()

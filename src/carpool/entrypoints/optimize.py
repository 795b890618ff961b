"""``carpool optimize``: the largest batch that fits a memory budget, and the sweet spot below it.

1. Estimate: the largest B with weights + KV cache + activations within the budget.
2. Confirm: run that batch for real (binary search below it if it fails; see
   ``carpool.capacity.fit``, whose trial is ``carpool.bench.optimize.engine_trial``).
3. Sweep: decode throughput at powers of two up to B; the sweet spot is where doubling the
   batch buys less than ``--knee`` (10%) more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from carpool.entrypoints.engine_args import parse_bytes

if TYPE_CHECKING:
    from carpool.capacity.fit import BatchFitter
    from carpool.config import EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``carpool optimize``."""
    p.add_argument(
        "--model", default=None, help="model directory or .gguf file (default: embedded model)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (prompt+output)")
    p.add_argument(
        "--memory-budget",
        type=parse_bytes,
        default=None,
        help="bytes for weights + KV cache + activations, e.g. 2GB (default: 90%% of the "
        "memory available now)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (auto: checkpoint's; fp16->bf16 on CPU)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument(
        "--max-batch-size", type=int, default=256, help="largest batch tried (default: 256)"
    )
    p.add_argument(
        "--gen-len", type=int, default=16, help="tokens generated per request in the sweep"
    )
    p.add_argument(
        "--knee", type=float, default=0.10, help="sweet spot: next size gains less than this"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="sweep: timed rounds of B requests per batch size (default: 3)",
    )
    p.add_argument("--no-sweep", action="store_true", help="only find the largest batch")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the engines it runs (default: carpool's, see EngineConfig)",
    )
    p.add_argument("--output", type=Path, default=None, help="write the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Estimate, confirm, sweep; print a summary and write JSON on request."""
    from carpool.bench.optimize import engine_trial
    from carpool.capacity import (
        available_memory_bytes,
        estimate_memory,
        format_bytes,
        largest_batch_by_estimate,
        read_model_config,
    )
    from carpool.capacity.fit import BatchFitter, largest_fitting_batch, probes_as_dicts
    from carpool.config import EngineConfig
    from carpool.engine.model_path import resolve_model_path
    from carpool.errors import CarpoolError
    from carpool.model.loader import resolve_dtype

    try:
        path = resolve_model_path(args.model)
        config = read_model_config(path)
        dtype = resolve_dtype(args.dtype, config, args.device)
    except (CarpoolError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nbytes = dtype.itemsize
    budget = args.memory_budget or int(0.9 * available_memory_bytes(args.device))
    if args.rounds < 1 or args.max_batch_size < 1:
        print("error: --rounds and --max-batch-size must be >= 1", file=sys.stderr)
        return 2
    by_memory = largest_batch_by_estimate(
        config, args.seq_len, budget, nbytes, None, args.block_size
    )
    estimate = min(args.max_batch_size, by_memory)
    base = EngineConfig(
        model=str(path),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        seed=args.seed,
        threads=args.threads,
    )
    fitter = BatchFitter(base, config, nbytes, args.seq_len, budget, engine_trial)
    best = largest_fitting_batch(fitter, estimate)
    result: dict[str, object] = {
        "model": str(path),
        "dtype": str(dtype).replace("torch.", ""),
        "seq_len": args.seq_len,
        "memory_budget": budget,
        "estimated_batch": estimate,
        "largest_batch": best,
        "memory_at_largest": (
            estimate_memory(config, best, args.seq_len, nbytes, None, args.block_size).to_dict()
            if best
            else None
        ),
        "next_batch_check": probes_as_dicts([fitter.budget_check(best + 1)])[0],
        "probes": probes_as_dicts(fitter.probes),
    }
    print(
        f"budget {format_bytes(budget)}, seq {args.seq_len}: estimate says batch {estimate}; "
        f"confirmed batch {best} runs"
        + (f" (batch {best + 1}: {fitter.budget_check(best + 1).reason or 'fits'})" if best else "")
    )
    if best and best == args.max_batch_size < by_memory:
        print(
            f"stopped at --max-batch-size {args.max_batch_size}: the memory estimate allows "
            f"batch {by_memory}; raise --max-batch-size to try larger batches"
        )
    chosen = best
    if best and not args.no_sweep:
        result.update(_sweep(fitter, best, args))
        chosen = int(result["sweet_spot"])  # type: ignore[call-overload]
        print(
            f"sweet spot: batch {chosen} (the next size gains < "
            f"{args.knee:.0%} decode throughput; medians of {args.rounds} rounds per size)"
        )
    if chosen:
        flags = serve_flags(fitter.engine_config(chosen), args.model, args.dtype)
        result["serve_command"] = flags
        print(f"to serve it: {flags}")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if best else 1


def serve_flags(config: EngineConfig, model: str | None, dtype: str) -> str:
    """The ``carpool serve`` command that runs ``config``'s batch within the budget."""
    import shlex

    parts = ["carpool", "serve"] + (["--model", model] if model else [])
    parts += ["--max-num-seqs", str(config.max_num_seqs)]
    parts += ["--max-model-len", str(config.max_model_len)]
    parts += ["--kv-cache-memory", str(config.kv_cache_memory)]
    parts += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if dtype != "auto":
        parts += ["--dtype", dtype]
    return shlex.join(parts)


def _sweep(fitter: BatchFitter, best: int, args: argparse.Namespace) -> dict[str, object]:
    """Decode throughput at powers of two up to ``best`` on one engine sized for ``best``,
    ``--rounds`` timed rounds per size, with a progress bar over the rounds."""
    from tqdm.auto import tqdm

    from carpool.bench.probes import measure_roofline
    from carpool.bench.sweep import SweepSpec, run_sweep
    from carpool.capacity.fit import sweep_sizes, sweet_spot
    from carpool.engine.llm_engine import LLMEngine

    gen = max(2, min(args.gen_len, args.seq_len - 1))
    sizes = sweep_sizes(best)
    engine = LLMEngine(fitter.engine_config(best))
    weight = next(engine.model.parameters())
    roof = measure_roofline(weight.dtype, engine.config.device)
    rows = []
    with tqdm(total=len(sizes) * args.rounds, unit="round", desc="sweep") as bar:
        for b in sizes:
            bar.set_postfix(batch=b)
            spec = SweepSpec(
                batch_sizes=(b,),
                num_requests=args.rounds * b,  # ``rounds`` rounds of b requests
                prompt_len=args.seq_len - gen,
                gen_len=gen,
                seed=args.seed,
            )
            rows += run_sweep(
                engine, spec, roof, weight.element_size(), on_round=lambda _b: bar.update(1)
            )
    points = [(r.b, r.s_tg) for r in rows]
    return {
        "sweep": [
            {"batch_size": r.b, "decode_tok_s": r.s_tg, "latency_mean_ms": r.latency_mean_ms}
            for r in rows
        ],
        "sweet_spot": sweet_spot(points, args.knee),
        "roofline": roof.to_dict(),
    }

"""Command-line flags for ``EngineConfig``, shared by every subcommand that starts an engine."""

from __future__ import annotations

import argparse
import re

from carpool.config import BATCHING_STRATEGIES, LAYOUTS, SCHEDULING_POLICIES, EngineConfig

_UNITS = {
    "": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1e6"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _int_list(text: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> ``(32, 64, 128)``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the engine's knobs (model, dtype, KV cache, batching limits)."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model", default=None, help="model directory or .gguf file (default: the embedded model)"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (auto: checkpoint's; fp16->bf16 on CPU)",
    )
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument(
        "--batching",
        default="continuous",
        choices=BATCHING_STRATEGIES,
        help="batching strategy (default: continuous)",
    )
    g.add_argument(
        "--layout",
        default="ragged",
        choices=LAYOUTS,
        help="variable lengths in one pass: ragged (packed) or padded (a rectangle "
        "with a mask, pad tokens computed) (default: ragged)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="static/bucketed: requests per batch; dynamic: largest batch launched (default: 8)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=50.0,
        help="dynamic: launch a partial batch once its oldest request waited this "
        "long (default: 50)",
    )
    g.add_argument(
        "--num-buckets",
        type=int,
        default=4,
        help="bucketed: log-spaced prompt-length buckets (default: 4)",
    )
    g.add_argument(
        "--bucket-boundaries",
        type=_int_list,
        default=None,
        help="bucketed: comma-separated ascending prompt-length bounds, e.g. 32,64,128 "
        "(overrides --num-buckets)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="most sequences in one forward pass (default: 64)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="most tokens in one forward pass; longer prompts are chunked (default: 512)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help="KV cache size, e.g. 256MiB (default: a fraction of free memory)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: the model's)",
    )
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of full blocks shared by requests with the same prefix "
        "(continuous batching) (default: on)",
    )
    g.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=SCHEDULING_POLICIES,
        help="waiting order: fcfs, or priority (lower request priority first, may preempt "
        "worse-priority running requests) (default: fcfs)",
    )
    g.add_argument(
        "--priority-aging-s",
        type=float,
        default=10.0,
        help="priority policy: each this many seconds waited improve a request's "
        "priority by 1, so none starves (default: 10)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the ``EngineConfig`` from parsed flags."""
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        batching=args.batching,
        layout=args.layout,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        num_buckets=args.num_buckets,
        bucket_boundaries=args.bucket_boundaries,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        seed=args.seed,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        priority_aging_s=args.priority_aging_s,
    )

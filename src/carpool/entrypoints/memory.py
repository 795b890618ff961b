"""``carpool memory``: weights, KV cache and activation memory of a model at a batch size.

Reads only the model's config (a model directory, a ``.gguf`` file or a bare ``config.json``),
so a 70B model can be planned without its weights; the formulas are the engine's
(``carpool.capacity.estimate_memory``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carpool.capacity import MemoryEstimate, estimate_memory, format_bytes
from carpool.config import (
    KV_CACHE_DTYPES,
    QUANTIZATION_CHOICES,
    EngineConfig,
    ModelConfig,
    dtype_bytes,
    kv_row_bytes,
)
from carpool.entrypoints.engine_args import parse_bytes
from carpool.errors import CarpoolError
from carpool.model.quant_plan import plan_summary

_DTYPES = ["auto", "float32", "bfloat16", "float16"]
_KV_DTYPES = ["float32", "bfloat16", "float16", "fp8", "int8"]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``carpool memory``."""
    p.add_argument(
        "--model",
        default=None,
        help="model directory, .gguf file or config.json (default: the embedded model)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences served together")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence, prompt + output (default: the model's context)",
    )
    p.add_argument(
        "--dtype", default="auto", choices=_DTYPES, help="weight dtype (auto: the config's)"
    )
    p.add_argument(
        "--kv-dtype", default=None, choices=_KV_DTYPES, help="KV-cache dtype (default: --dtype)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="the engine's flag: auto (--kv-dtype, or --dtype), bfloat16, or int8 (int8 rows "
        "with a float32 scale each: head_dim + 4 bytes per row) (default: auto)",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=[c for c in QUANTIZATION_CHOICES if c],
        help="weight-only quantization, as the engine's flag (default: a GGUF file's own "
        "Q8_0/Q4_0/Q4_1 matrices quantized, a Hugging Face checkpoint dense)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=EngineConfig.max_num_batched_tokens,
        help="tokens per forward pass for the activation estimate: the engine prefills longer "
        f"batches in chunks of this many (default: the engine's, "
        f"{EngineConfig.max_num_batched_tokens})",
    )
    p.add_argument(
        "--device-memory",
        type=parse_bytes,
        default=None,
        help="memory of the target device, e.g. 40GB (default: this machine's)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=None,
        help="batch sizes of the table (default: powers of two up to 4 x --batch-size)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write memory vs batch size as PNG")
    p.add_argument("--output", type=Path, default=None, help="write the figures as JSON")


def _dtype_nbytes(name: str, config: ModelConfig) -> tuple[str, int]:
    if name == "auto":
        name = config.torch_dtype.replace("torch.", "")
        if name not in ("float32", "bfloat16", "float16"):
            name = "float32"
    return name, dtype_bytes(name)


def format_count(n: int) -> str:
    """A parameter count at any size: ``4.0M``, ``135M``, ``1.24B``, ``70.6B``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            digits = 2 if value < 10 and unit in "BT" else (1 if value < 100 else 0)
            return f"{value:.{digits}f}{unit}"
    return str(n)


def table(rows: list[MemoryEstimate], device_memory: int) -> str:
    """Markdown table: one row per batch size, with whether it fits."""
    lines = [
        "| batch | weights | KV cache | activations | total | fits |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for e in rows:
        cells = [str(e.batch_size), *map(format_bytes, (e.weights, e.kv_cache, e.activations))]
        cells += [format_bytes(e.total), "yes" if e.fits(device_memory) else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(path: Path, rows: list[MemoryEstimate], device_memory: int, title: str) -> None:
    """Stacked weights / KV cache / activations vs batch size, the device's memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [e.batch_size for e in rows]
    gb = 1e9
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.stackplot(
        b,
        [e.weights / gb for e in rows],
        [e.kv_cache / gb for e in rows],
        [e.activations / gb for e in rows],
        labels=["weights", "KV cache", "activations (estimate)"],
        alpha=0.8,
    )
    ax.axhline(device_memory / gb, color="red", linestyle="--", label="device memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("GB")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Print the estimate at ``--batch-size``, whether it fits, and the table over batches."""
    import torch

    from carpool.capacity import device_memory_bytes, largest_batch_by_estimate, read_model_config
    from carpool.engine.model_path import resolve_model_path
    from carpool.model.kv_quant import effective_kv_cache_dtype
    from carpool.model.quant_loader import checkpoint_plan

    try:
        path = resolve_model_path(args.model)
        config = read_model_config(path)
        plan = checkpoint_plan(path, config, args.quantization)
    except CarpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seq_len is None:
        args.seq_len = config.max_model_len
    elif args.seq_len > config.max_model_len:
        print(
            f"warning: --seq-len {args.seq_len} is above the model's context of "
            f"{config.max_model_len} tokens; the engine refuses longer sequences unless "
            "--allow-long-max-model-len",
            file=sys.stderr,
        )
    if args.batch_size < 1 or args.seq_len < 1:
        print("error: --batch-size and --seq-len must be >= 1", file=sys.stderr)
        return 2
    dtype, nbytes = _dtype_nbytes(args.dtype, config)
    # The cache dtype by name: "int8" is the engine's int8 cache (values + a scale per row), so
    # every figure below comes from ModelConfig.kv_bytes_per_token_for, as the engine's.
    kv_cache_dtype = effective_kv_cache_dtype(
        args.kv_cache_dtype, getattr(torch, dtype), any(plan.values())
    )  # as the engine resolves "auto" (a quantized float32 model stores bfloat16)
    kv_dtype = (args.kv_dtype or dtype) if kv_cache_dtype == "auto" else kv_cache_dtype
    kv_nbytes = kv_dtype
    device_memory = args.device_memory or device_memory_bytes("cpu")
    sizes = args.batch_sizes or tuple(
        1 << k for k in range((4 * args.batch_size).bit_length()) if 1 << k <= 4 * args.batch_size
    )
    sizes = tuple(sorted(set(sizes) | {args.batch_size}))

    def estimate(b: int) -> MemoryEstimate:
        return estimate_memory(
            config,
            b,
            args.seq_len,
            nbytes,
            kv_nbytes,
            args.block_size,
            args.max_num_batched_tokens,
            plan,
        )

    est = estimate(args.batch_size)
    rows = [estimate(b) for b in sizes]
    largest = largest_batch_by_estimate(
        config,
        args.seq_len,
        device_memory,
        nbytes,
        kv_nbytes,
        args.block_size,
        args.max_num_batched_tokens,
        plan=plan,
    )
    per_token = config.kv_bytes_per_token_for(kv_nbytes)
    print(
        f"model: {config.architecture}, {format_count(config.num_parameters)} parameters, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"{config.num_key_value_heads} KV heads x {config.head_dim}; weights {dtype}, KV {kv_dtype}"
    )
    print(f"weight matrices: {plan_summary(plan)} (scales and dense tensors in {dtype})")
    row = (
        f"({config.head_dim} x 1 B + 4 B scale)"
        if kv_dtype == "int8"
        else f"{config.head_dim} x {kv_row_bytes(1, kv_dtype)} B"
    )
    print(
        f"KV cache per token: 2 x {config.num_hidden_layers} layers x "
        f"{config.num_key_value_heads} kv heads x {row} = {per_token:,} B "
        f"({per_token / 1024:.1f} KiB)"
    )
    print(f"batch {args.batch_size} x {args.seq_len} tokens:")
    print(f"  weights      {format_bytes(est.weights):>10}")
    print(f"  KV cache     {format_bytes(est.kv_cache):>10}")
    print(f"  activations  {format_bytes(est.activations):>10}  (estimate: peak of one pass)")
    print(f"  total        {format_bytes(est.total):>10}")
    verdict = "fits in" if est.fits(device_memory) else "does NOT fit in"
    print(
        f"=> {verdict} {format_bytes(device_memory)} of device memory; the largest batch of "
        f"{args.seq_len} tokens that fits is {largest}\n"
    )
    print(table(rows, device_memory))
    if args.plot is not None:
        title = f"{format_count(config.num_parameters)} {config.architecture}, seq {args.seq_len}"
        write_plot(args.plot, rows, device_memory, title)
    if args.output is not None:
        payload = {
            "model": str(args.model or "default"),
            "dtype": dtype,
            "kv_dtype": kv_dtype,
            "quantization": plan_summary(plan),
            "seq_len": args.seq_len,
            "device_memory": device_memory,
            "kv_bytes_per_token": per_token,
            "estimate": est.to_dict(),
            "fits": est.fits(device_memory),
            "largest_batch": largest,
            "table": [e.to_dict() for e in rows],
        }
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0

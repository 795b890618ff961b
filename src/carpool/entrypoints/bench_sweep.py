"""``carpool bench [batch]``: the batch-size sweep's flags and runner.

The flags join ``carpool bench``'s one parser (its engine flags included); ``run`` builds an
engine sized for the largest batch, measures the roofline, sweeps and writes the reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
from pathlib import Path

from carpool.config import EngineConfig
from carpool.entrypoints.report_args import add_report_arguments, plot_path


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return sizes


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the batch-size sweep (``--output`` and ``--plot`` are shared with ``serve``)."""
    g = parser.add_argument_group("batch-size sweep (mode: batch)")
    g.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=(1, 2, 4, 8, 16, 32, 64),
        help="comma-separated batch sizes (default: 1,2,4,8,16,32,64)",
    )
    g.add_argument(
        "--requests",
        type=int,
        default=100,
        help="requests per batch size, run in rounds of B at once (default: 100)",
    )
    g.add_argument("--prompt-len", type=int, default=128, help="PP: prompt tokens (default: 128)")
    g.add_argument("--gen-len", type=int, default=128, help="TG: generated tokens (default: 128)")
    add_report_arguments(
        g,
        output_help="write the results as JSON (batch and serve modes), e.g. batch_analysis.json",
        plot_help="write a plot (default path: --output with .png)",
    )
    g.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a torch.profiler chrome trace of a few steps of the largest batch to DIR",
    )


def sweep_engine_config(
    base: EngineConfig, batch_sizes: tuple[int, ...], prompt_len: int, gen_len: int
) -> EngineConfig:
    """``base`` widened so the largest batch is prefilled in one pass and decoded together.

    The KV cache holds every sequence at full length (an explicit ``kv_cache_memory`` is kept).
    """
    from carpool.capacity import kv_cache_bytes_for, kv_element, read_model_config
    from carpool.engine.model_path import resolve_model_path
    from carpool.model.loader import resolve_dtype

    largest = max(batch_sizes)
    seq_len = prompt_len + gen_len
    kv_memory = base.kv_cache_memory
    if kv_memory is None:
        mc = read_model_config(resolve_model_path(base.model, base.revision, base.gguf_file))
        nbytes = resolve_dtype(base.dtype, mc, base.device).itemsize
        kv = kv_element(base, nbytes)
        kv_memory = kv_cache_bytes_for(mc, largest, seq_len, kv, base.block_size)
    return dataclasses.replace(
        base,
        batching="continuous",
        max_num_seqs=max(base.max_num_seqs, largest),
        max_num_batched_tokens=max(base.max_num_batched_tokens, largest * prompt_len),
        max_model_len=max(base.max_model_len or 0, seq_len),
        kv_cache_memory=kv_memory,
    )


def run_sweep_cli(args: argparse.Namespace) -> int:
    """Run the sweep from parsed flags; markdown on stdout, JSON/PNG/trace on request."""
    from tqdm.auto import tqdm

    from carpool.bench.probes import measure_roofline
    from carpool.bench.random_model import save_random_llama
    from carpool.bench.sweep import SweepSpec, measure_sweep, profile_steps, sweep_rows
    from carpool.bench.sweep_report import markdown_table, write_json, write_plot
    from carpool.engine.llm_engine import LLMEngine
    from carpool.entrypoints.engine_args import engine_config_from_args

    spec = SweepSpec(
        batch_sizes=args.batch_sizes,
        num_requests=args.requests,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        seed=args.seed,
    )
    base = engine_config_from_args(args)
    with tempfile.TemporaryDirectory(prefix="carpool-sweep-") as tmp:
        if args.random_config:
            dtype = "float32" if args.dtype == "float32" else "bfloat16"
            model_dir = save_random_llama(Path(tmp), args.random_config, dtype=dtype)
            base = dataclasses.replace(base, model=str(model_dir), dtype=dtype)
        config = sweep_engine_config(base, spec.batch_sizes, spec.prompt_len, spec.gen_len)
        engine = LLMEngine(config)
        weight = next(engine.model.parameters())
        roof = measure_roofline(weight.dtype, config.device)
        total = sum(spec.rounds(b) for b in spec.batch_sizes)
        with tqdm(total=total, unit="round", desc="batch sweep") as bar:

            def progress(batch: int) -> None:
                bar.set_postfix(B=batch)
                bar.update(1)

            measured = measure_sweep(engine, spec, progress)
        # Probe again after the sweep and keep the best: on a shared machine either may be low.
        roof = roof.best_of(measure_roofline(weight.dtype, config.device))
        rows = sweep_rows(engine.model_config, spec, measured, roof, weight.element_size())
        trace = None
        if args.profile is not None:
            trace = profile_steps(engine, max(spec.batch_sizes), spec, args.profile)

    table = markdown_table(rows)
    print(table)
    mc = engine.model_config
    model_name = args.random_config or str(engine.model_path)
    print(
        f"model {model_name} ({mc.num_parameters / 1e6:.1f}M params, {weight.dtype}); roofline: "
        f"{roof.peak_flops / 1e9:.0f} GFLOP/s matmul, {roof.bandwidth / 1e9:.1f} GB/s read",
        file=sys.stderr,
    )
    command = "carpool " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "carpool bench"
    meta = {
        "command": command,
        "model": model_name,
        "num_parameters": mc.num_parameters,
        "dtype": str(weight.dtype).replace("torch.", ""),
        "workload": dataclasses.asdict(spec),
    }
    output = Path(args.output) if args.output else None
    if output is not None:
        write_json(output, rows, roof, meta)
    png = plot_path(args, "batch_analysis.json")
    if png is not None:
        title = f"{model_name}, PP={spec.prompt_len} TG={spec.gen_len}, {meta['dtype']}"
        write_plot(png, rows, title)
    if trace is not None:
        print(f"profiler trace: {trace}", file=sys.stderr)
    return 0

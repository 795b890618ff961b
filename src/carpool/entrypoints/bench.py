"""``carpool bench [MODE]``: benchmarks of the engine.

Modes (each a function ``run_<mode>(args) -> int`` registered in ``MODES``):

- ``strategies``: one workload through every batching strategy and layout (table, JSON, plot).
- ``batch`` (the default; alias ``sweep``): throughput, latency and roofline per batch size
  (``carpool.entrypoints.bench_sweep``).
- ``serve``: an asynchronous load generator against a running OpenAI-compatible server
  (``carpool.entrypoints.bench_serve``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from carpool.config import BATCHING_STRATEGIES, LAYOUTS
from carpool.entrypoints.bench_serve import add_serve_arguments, run_serve_cli
from carpool.entrypoints.bench_sweep import add_sweep_arguments, run_sweep_cli
from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args
from carpool.errors import CarpoolError


def _names(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return names

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "mode",
        nargs="?",
        default="batch",
        choices=sorted(MODES),
        help="what to benchmark: batch (batch-size sweep, alias sweep), serve (load on a "
        "running server), strategies (batching strategies side by side) (default: batch)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--random-config",
        choices=["small", "medium", "tiny"],
        default=None,
        help="benchmark a random-weight Llama built in a temp dir instead of --model "
        "(small: hidden 512, 8 layers, vocab 32000, ~58M parameters; medium: hidden 1024, "
        "16 layers, 4 KV heads, ~246M)",
    )
    w = p.add_argument_group("workload (strategies)")
    w.add_argument(
        "--workload",
        default="long-tail",
        choices=["fixed", "uniform", "long-tail"],
        help="output-length distribution (default: long-tail, lognormal)",
    )
    w.add_argument("--num-requests", type=int, default=64, help="requests (default: 64)")
    w.add_argument("--min-prompt-len", type=int, default=16, help="shortest prompt (default: 16)")
    w.add_argument("--max-prompt-len", type=int, default=128, help="longest prompt (default: 128)")
    w.add_argument(
        "--output-len",
        type=int,
        default=32,
        help="median (long-tail), mean (uniform) or exact (fixed) output length",
    )
    w.add_argument(
        "--max-output-len",
        type=int,
        default=256,
        help="longest output; long-tail puts its 99th percentile here (default: 256)",
    )
    w.add_argument(
        "--arrival",
        default="all",
        choices=["all", "poisson"],
        help="all requests at t=0, or Poisson arrivals at --rate (default: all)",
    )
    w.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    w.add_argument("--workload-seed", type=int, default=0, help="seed of the workload draw")
    w.add_argument("--warmup", type=int, default=4, help="warm-up requests per engine")
    w.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per strategy and layout; the table shows medians (default: 1)",
    )
    s = p.add_argument_group("strategies")
    s.add_argument(
        "--strategies",
        type=_names(BATCHING_STRATEGIES),
        default=BATCHING_STRATEGIES,
        help="comma-separated (default: all)",
    )
    s.add_argument(
        "--layouts",
        type=_names(LAYOUTS),
        default=LAYOUTS,
        help="comma-separated (default: ragged,padded)",
    )
    s.add_argument(
        "--out-dir",
        type=Path,
        default=Path("bench-results"),
        help="where strategies.md, strategies.json and strategies.png go",
    )
    # ---- batch-size sweep and serving load (issue 6) ----
    add_sweep_arguments(p)
    add_serve_arguments(p)
    add_engine_arguments(p)


def run_strategies(args: argparse.Namespace) -> int:
    """Run the workload through every strategy x layout and write the reports."""
    from tqdm.auto import tqdm

    from carpool.bench.random_model import save_random_llama
    from carpool.bench.report import markdown_table, write_json, write_plot
    from carpool.bench.strategies import median_result, run_strategy
    from carpool.bench.workloads import WorkloadSpec, make_workload
    from carpool.config import ModelConfig
    from carpool.engine.model_path import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="carpool-bench-") as tmp:
        base = engine_config_from_args(args)
        if args.random_config:
            dtype = "float32" if args.dtype == "float32" else "bfloat16"
            model_dir = save_random_llama(Path(tmp), args.random_config, dtype=dtype)
            base = dataclasses.replace(base, model=str(model_dir))
        path = resolve_model_path(base.model)
        vocab = (
            ModelConfig.from_json_file(path / "config.json").vocab_size if path.is_dir() else 256
        )
        spec = WorkloadSpec(
            kind=args.workload,
            num_requests=args.num_requests,
            min_prompt_len=args.min_prompt_len,
            max_prompt_len=args.max_prompt_len,
            output_len=args.output_len,
            max_output_len=args.max_output_len,
            arrival=args.arrival,
            rate=args.rate,
            seed=args.workload_seed,
            vocab_size=vocab,
        )
        requests = make_workload(spec)
        # Sequential runs one row per step, so both layouts compute exactly the same tensors:
        # run it once (ragged) when both layouts are asked for.
        runs = [
            (s, lay)
            for s in args.strategies
            for lay in args.layouts
            if not (s == "sequential" and lay == "padded" and "ragged" in args.layouts)
        ]
        results = []
        bar = tqdm(total=len(runs) * args.repeats * len(requests), unit="req")
        for strategy, layout in runs:
            bar.set_description(f"{strategy}/{layout}")
            repeats = [
                run_strategy(
                    base,
                    strategy,
                    layout,
                    requests,
                    args.warmup,
                    on_finish=lambda _out: bar.update(1),
                )
                for _ in range(args.repeats)
            ]
            results.append(median_result(repeats))
        bar.close()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "carpool " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "carpool bench"
    table = markdown_table(results)
    (args.out_dir / "strategies.md").write_text(table)
    meta = {
        "command": command,
        "workload": spec.to_dict(),
        "engine": {k: v for k, v in dataclasses.asdict(base).items() if k != "model"},
        "model": args.random_config or str(base.model),
        "repeats": args.repeats,
    }
    write_json(args.out_dir / "strategies.json", results, meta)
    title = f"{spec.kind} workload, {spec.num_requests} requests, arrivals: {spec.arrival}"
    plotted = write_plot(args.out_dir / "strategies.png", results, title)
    print(table)
    best = max(results, key=lambda r: r.tokens_per_s)
    print(
        f"best throughput: {best.strategy}/{best.layout} {best.tokens_per_s:.1f} tokens/s; "
        f"wrote {args.out_dir}/strategies.{{md,json{',png' if plotted else ''}}}",
        file=sys.stderr,
    )
    return 0


# mode -> runner.
MODES: dict[str, Callable[[argparse.Namespace], int]] = {
    "batch": run_sweep_cli,
    "sweep": run_sweep_cli,
    "serve": run_serve_cli,
    "strategies": run_strategies,
}


def run(args: argparse.Namespace) -> int:
    try:
        return MODES[args.mode](args)
    except (CarpoolError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

"""Serving peers: ``carpool serve`` beside llama.cpp's ``llama-server`` on the same GGUF file.

    python benchmarks/peers/serve_peers.py --threads 2 --rounds 2 \\
        --output benchmarks/results/serve_peers.json -- \\
        --num-prompts 32 --prompt-len 64 --gen-len 128 --max-concurrency 16

Each round starts each server in turn on a free loopback port (the same ``--threads``;
``llama-server`` with ``--parallel`` slots, continuous batching, ``--ctx-size`` shared by them),
drives it with the same ``carpool bench serve`` command (streamed ``/v1/completions``, EOS
ignored, so both produce the same number of tokens), reads its resident high-water mark
(``VmHWM``) and stops it. ``llama-server`` comes from ``build_llama_cpp.sh``; where ggml's AMX
repacking faults on this machine's VMs (as in ``run.py``), it is restarted with ``-nr``.
Prints the medians side by side and writes every summary to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import batched_bench  # noqa: E402
import models  # noqa: E402
from run import vm_hwm_mib  # noqa: E402
from serve_util import (  # noqa: E402
    CARPOOL,
    ServerDied,
    bench_serve,
    free_port,
    start_server,
    stop_server,
)

SYSTEMS = ("carpool", "llama.cpp")


def llama_server_command(
    binary: Path, gguf: Path, port: int, threads: int, parallel: int, ctx: int, no_repack: bool
) -> list[str]:
    """``llama-server`` on ``gguf``: ``threads`` for decode and prompts, ``parallel`` slots
    sharing ``ctx`` tokens of KV cache, continuous batching (its default), loopback only."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx)]
    return cmd + (["-nr"] if no_repack else [])


def carpool_server_command(gguf: Path, port: int, threads: int) -> list[str]:
    """``carpool serve`` on ``gguf`` with ``threads`` torch threads."""
    cmd = [*CARPOOL, "serve", "--model", str(gguf)]
    return cmd + ["--port", str(port), "--threads", str(threads)]


def run_system(system: str, args: argparse.Namespace, state: dict, out: Path) -> dict:
    """One server of ``system``, one bench run; the bench's summary plus command and peak RSS."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"serve_peers_{system}.log"
    if system == "carpool":
        cmd = carpool_server_command(args.gguf, port, args.threads)
        server = start_server(cmd, url, log)
    else:
        binary = args.llama_bin / "llama-server"
        while True:
            no_repack = state.get("no_repack", False)
            cmd = llama_server_command(
                binary, args.gguf, port, args.threads, args.parallel, args.ctx, no_repack
            )
            try:
                server = start_server(cmd, url, log)
                break
            except ServerDied as e:
                if e.returncode not in (-signal.SIGILL, -signal.SIGSEGV) or no_repack:
                    raise
                # ggml's AMX kernels fault on this project's VMs (see run.py): without them.
                print(f"  llama-server died of signal {-e.returncode}; -nr", file=sys.stderr)
                state["no_repack"] = True
    try:
        result = bench_serve(url, args.bench_args, out)
        peak = vm_hwm_mib(server.pid)  # VmHWM only grows: the peak of the whole run
    finally:
        stop_server(server)
    assert peak is not None, f"{system}'s server exited during the run"
    result.update(server_command=shlex.join(cmd), peak_rss_mib=peak)
    return result


def _median(runs: list[dict], key: str, sub: str | None = None) -> float:
    return statistics.median(r[key][sub] if sub else r[key] for r in runs)


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: each system's medians and carpool / llama.cpp."""
    rows = [
        ("duration s", "duration_s", None, False),
        ("output tokens/s", "output_throughput", None, True),
        ("TTFT p50 ms", "ttft_ms", "p50", False),
        ("TPOT p50 ms", "tpot_ms", "p50", False),
        ("ITL p50 ms", "itl_ms", "p50", False),
        ("E2E p50 ms", "e2el_ms", "p50", False),
        ("peak RSS MiB", "peak_rss_mib", None, False),
    ]
    lines = ["| | carpool | llama.cpp | carpool advantage |", "|---|---:|---:|---:|"]
    for label, key, sub, higher_better in rows:
        c, ll = (_median(results[s], key, sub) for s in SYSTEMS)
        ratio = c / ll if higher_better else ll / c
        lines.append(f"| {label} | {c:,.1f} | {ll:,.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="default: SmolLM2-135M-Instruct Q4_1 (models.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16, help="llama-server's slots")
    p.add_argument("--ctx", type=int, default=16384, help="llama-server's KV tokens, all slots")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--llama-bin", type=Path, help="default: build_llama_cpp.sh's bin/")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then carpool bench serve's")
    args = p.parse_args()
    args.bench_args = [a for a in args.bench_args if a != "--"]
    cache = Path.home() / ".cache" / "carpool"
    args.gguf = args.gguf or models.prepare("smollm2", cache).ggufs["Q4_1"]
    args.llama_bin = args.llama_bin or batched_bench.build_tools(sys.executable)
    results: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    state: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            for system in SYSTEMS:
                res = run_system(system, args, state, Path(tmp) / f"{system}_{r}.json")
                results[system].append(res)
                print(
                    f"round {r} {system}: {res['duration_s']:.2f} s,"
                    f" {res['output_throughput']:.1f} tokens/s, TPOT p50"
                    f" {res['tpot_ms']['p50']:.1f} ms, peak RSS {res['peak_rss_mib']:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.processor() or platform.machine(),
        "llama_cpp_python": batched_bench.llama_cpp_version(),
        "gguf": str(args.gguf),
        "threads": args.threads,
        "bench_args": args.bench_args,
        "results": results,
    }
    args.output.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

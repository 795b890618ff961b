"""Replicas and routing (issue 7): 1 vs 2 replicas, least-loaded vs round-robin, under load.

For each configuration this starts ``carpool serve`` (``--replicas N --routing R
--threads-per-replica T``) on a free port, waits for ``/health`` (``serve_util.start_server``;
the server's log in ``$TMPDIR/replicas_N_R.log``), drives it with ``carpool bench serve``
(synthetic long-tail prompt and output lengths, Poisson arrivals) and prints one markdown row
per configuration from the JSON it writes. The random model's every token decodes to text, so
TTFT is the first token's.

    .venv/bin/python benchmarks/replicas.py --random-config small --num-prompts 60 \\
        --request-rate 4 --configs 1:least-loaded,2:least-loaded,2:round-robin
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from serve_util import CARPOOL, bench_serve, free_port, start_server, stop_server


def _serve_cmd(model: str, replicas: int, routing: str, threads: int, port: int) -> list[str]:
    cmd = [*CARPOOL, "serve", "--model", model, "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-num-seqs", "32", "--kv-cache-memory", "64MiB"]
    if replicas > 1:
        cmd += ["--replicas", str(replicas), "--routing", routing]
        cmd += ["--threads-per-replica", str(threads)]
    else:  # --threads, not OMP_NUM_THREADS: the engine sets torch's threads (default 1)
        cmd += ["--threads", str(threads)]
    return cmd


def run_one(model: str, replicas: int, routing: str, args: argparse.Namespace) -> dict:
    """Serve, load, stop; returns the bench summary."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = args.threads_per_replica if replicas > 1 else args.threads_single
    # The server's log: beside the system's temporary files, not the results.
    log = Path(tempfile.gettempdir()) / f"replicas_{replicas}_{routing}.log"
    server = start_server(_serve_cmd(model, replicas, routing, threads, port), url, log)
    try:
        bench = ["--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate)]
        bench += ["--ignore-eos", "--prompt-len", str(args.prompt_len)]
        bench += ["--gen-len", str(args.gen_len), "--seed", "0"]
        summary = bench_serve(url, bench, Path(tempfile.mkdtemp()) / "bench.json")
        print(json.dumps({k: summary[k] for k in ("completed", "failed", "ttft_ms", "e2el_ms")}),
              file=sys.stderr)  # fmt: skip
        return summary
    finally:
        stop_server(server)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: --random-config)")
    p.add_argument("--random-config", default="small", help="random Llama preset (small)")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--threads-single", type=int, default=1, help="torch threads, 1 replica")
    p.add_argument("--configs", default="1:least-loaded,2:least-loaded,2:round-robin")
    args = p.parse_args()
    model = args.model
    if model is None:
        from carpool.bench.random_model import save_random_llama

        model = str(
            save_random_llama(Path(tempfile.mkdtemp()) / "m", args.random_config, "float32")
        )
    print("| replicas | routing | threads | req/s done | output tok/s | TTFT p50 | TTFT p99 "
          "| E2E p50 | E2E p90 | E2E p99 | failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for item in args.configs.split(","):
        n, routing = item.split(":")
        s = run_one(model, int(n), routing, args)
        if not s["completed"]:
            raise RuntimeError(f"every request failed: {s['failures']}")
        threads = args.threads_per_replica if int(n) > 1 else args.threads_single
        ttft, e2e = s["ttft_ms"], s["e2el_ms"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f} ms"

        print(
            f"| {n} | {routing if int(n) > 1 else '-'} | {threads} "
            f"| {s['request_throughput']:.2f} | {s['output_throughput']:.1f} "
            f"| {ms(ttft['p50'])} | {ms(ttft['p99'])} | {ms(e2e['p50'])} "
            f"| {ms(e2e['p90'])} | {ms(e2e['p99'])} | {s['failed']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

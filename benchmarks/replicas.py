"""Replicas and routing (issue 7): 1 vs 2 replicas, least-loaded vs round-robin, under load.

For each configuration this starts ``carpool serve`` (``--replicas N --routing R
--threads-per-replica T``) on a free port, waits for ``/health``, drives it with ``carpool bench
serve`` (synthetic long-tail prompt and output lengths, Poisson arrivals) and prints one
markdown row per configuration from the JSON it writes.

    .venv/bin/python benchmarks/replicas.py --random-config small --num-prompts 60 \\
        --request-rate 4 --configs 1:least-loaded,2:least-loaded,2:round-robin
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_util import free_port, stop_server, wait_healthy

CARPOOL = str(Path(sys.executable).with_name("carpool"))


def _serve(model: str, replicas: int, routing: str, threads: int, port: int) -> subprocess.Popen:
    cmd = [CARPOOL, "serve", "--model", model, "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-num-seqs", "32", "--kv-cache-memory", "64MiB"]
    if replicas > 1:
        cmd += ["--replicas", str(replicas), "--routing", routing]
        cmd += ["--threads-per-replica", str(threads)]
    else:  # --threads, not OMP_NUM_THREADS: the engine sets torch's threads (default 1)
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_one(model: str, replicas: int, routing: str, args: argparse.Namespace) -> dict:
    """Serve, load, stop; returns the bench summary."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = args.threads_per_replica if replicas > 1 else args.threads_single
    server = _serve(model, replicas, routing, threads, port)
    try:
        wait_healthy(url)
        out = Path(tempfile.mkdtemp()) / "bench.json"
        bench = [CARPOOL, "bench", "serve", "--url", url, "--num-prompts", str(args.num_prompts)]
        bench += ["--request-rate", str(args.request_rate), "--ignore-eos"]
        bench += ["--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len)]
        bench += ["--seed", "0", "--output", str(out)]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads(out.read_text())
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

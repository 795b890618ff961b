"""Prefix caching and priority scheduling (issue 13), each measured side by side in one run.

1. Prefix caching: ``carpool serve`` with ``--enable-prefix-caching`` and with
   ``--no-enable-prefix-caching``, each loaded by ``carpool bench serve`` with the
   shared-prefix dataset (K system prompts of L = 1,000 tokens + user suffixes of ~111 tokens:
   90% of each prompt shared), Poisson arrivals; then the multi-turn mode on the cached server.
   Reports TTFT, throughput and the prefix-cache hit rate.
2. Priority: ``--scheduling-policy fcfs`` vs ``priority`` under a two-class workload (10%
   priority 0, 90% priority 10) of synthetic prompts at a rate near saturation; reports TTFT
   per class.

The model is a random-weight Llama (hidden 256, 4 layers, context 2,048: the embedded model's
1,024-token context cannot hold L = 1,000 plus suffix and answer), with a 259-id byte
vocabulary so every generated token decodes to text (TTFT is timed on the first text chunk).

    .venv/bin/python benchmarks/prefix_priority.py      # server: 1 torch thread
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import checkout
import httpx
from serve_util import free_port, stop_server, wait_healthy

CARPOOL = str(Path(sys.executable).with_name("carpool"))
ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    vocab_size=259,
    max_position_embeddings=2048,
)


def serve_and_load(model: str, serve_flags: list[str], bench_flags: list[str], threads: int):
    """Start ``carpool serve``, run ``carpool bench serve`` against it, stop it.

    Returns:
        (the bench JSON, the server's final /v1/stats, the bench command line).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [CARPOOL, "serve", "--model", model, "--port", str(port), "--dtype", "float32"]
    cmd += ["--kv-cache-memory", "64MiB", *serve_flags]
    # The CLI of this checkout (not the environment's editable install of another worktree).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": checkout.SRC}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            bench = [CARPOOL, "bench", "serve", "--url", url, "--seed", "0", "--ignore-eos"]
            bench += [*bench_flags, "--output", str(out)]
            subprocess.run(bench, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads(out.read_text())
        stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
    finally:
        stop_server(server)
    shown = " ".join(["carpool", *bench[1:-2]]).replace(url, "URL")
    return result, stats, shown


def _ms(d: dict, key: str = "p50") -> str:
    v = d.get(key)
    return "n/a" if v is None else f"{v:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--prefix-prompts", type=int, default=24)
    parser.add_argument("--prefix-rate", type=float, default=0.3, help="requests/s")
    parser.add_argument("--priority-prompts", type=int, default=80)
    parser.add_argument("--priority-rate", type=float, default=0.5, help="requests/s")
    parser.add_argument("--only", choices=["prefix", "priority"], default=None)
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "prefix_priority.json")
    )
    args = parser.parse_args()

    from carpool.bench.random_model import PRESETS, save_random_llama

    PRESETS["prefix-bench"] = SHAPE
    model = str(save_random_llama(tempfile.mkdtemp() + "/m", "prefix-bench", "float32"))
    report: dict = {"threads": args.threads, "model_shape": SHAPE, "runs": {}}

    if args.only in (None, "prefix"):
        flags = ["--shared-prefix-num-prefixes", "4", "--shared-prefix-len", "1000"]
        flags += ["--shared-prefix-suffix-len", "111", "--shared-prefix-vocab-size", "259"]
        flags += ["--num-prompts", str(args.prefix_prompts), "--gen-len", "16"]
        flags += ["--request-rate", str(args.prefix_rate)]
        for name, serve_flags in (
            ("cache_on", ["--enable-prefix-caching"]),
            ("cache_off", ["--no-enable-prefix-caching"]),
        ):
            res, stats, cmd = serve_and_load(model, serve_flags, flags, args.threads)
            report["runs"][name] = {"bench": res, "stats": stats, "command": cmd}
            print(
                f"{name}: TTFT p50 {_ms(res['ttft_ms'])} ms p99 {_ms(res['ttft_ms'], 'p99')} ms, "
                f"{res['request_throughput']:.2f} req/s, {res['output_throughput']:.1f} tok/s, "
                f"hit rate {stats['prefix_cache_hit_rate']:.3f}, failed {res['failed']}",
                flush=True,
            )
        on, off = report["runs"]["cache_on"]["bench"], report["runs"]["cache_off"]["bench"]
        report["ttft_p50_ratio_off_over_on"] = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
        report["throughput_ratio_on_over_off"] = on["output_throughput"] / off["output_throughput"]
        print(
            f"TTFT p50 off/on = {report['ttft_p50_ratio_off_over_on']:.1f}x, "
            f"throughput on/off = {report['throughput_ratio_on_over_off']:.2f}x",
            flush=True,
        )
        mt = ["--multi-turn", "4", "--num-prompts", "16", "--gen-len", "24"]
        mt += ["--request-rate", "0.2"]
        res, stats, cmd = serve_and_load(model, [], mt, args.threads)
        report["runs"]["multi_turn"] = {"bench": res, "stats": stats, "command": cmd}
        print(
            f"multi-turn: TTFT p50 {_ms(res['ttft_ms'])} ms, hit rate "
            f"{stats['prefix_cache_hit_rate']:.3f}",
            flush=True,
        )

    if args.only in (None, "priority"):
        flags = ["--priority-classes", "0:0.1,10:0.9", "--num-prompts", str(args.priority_prompts)]
        flags += ["--prompt-len", "40", "--gen-len", "32"]
        flags += ["--request-rate", str(args.priority_rate)]
        for policy in ("fcfs", "priority"):
            serve_flags = ["--scheduling-policy", policy, "--max-num-seqs", "8"]
            res, stats, cmd = serve_and_load(model, serve_flags, flags, args.threads)
            report["runs"][policy] = {"bench": res, "stats": stats, "command": cmd}
            cls = res["by_priority"]
            print(
                f"{policy}: p0 TTFT p50 {_ms(cls['0']['ttft_ms'])} p99 "
                f"{_ms(cls['0']['ttft_ms'], 'p99')} ms; p10 TTFT p50 {_ms(cls['10']['ttft_ms'])} "
                f"p99 {_ms(cls['10']['ttft_ms'], 'p99')} ms; {res['request_throughput']:.2f} req/s;"
                f" preemptions {stats['num_preemptions_by_cause']}",
                flush=True,
            )
        fc = report["runs"]["fcfs"]["bench"]["by_priority"]["0"]["ttft_ms"]["p99"]
        pr = report["runs"]["priority"]["bench"]["by_priority"]["0"]["ttft_ms"]["p99"]
        report["priority0_ttft_p99_ratio_fcfs_over_priority"] = fc / pr
        print(f"priority-0 TTFT p99 fcfs/priority = {fc / pr:.1f}x", flush=True)

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

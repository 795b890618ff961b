"""What open dashboards cost the engine: decode throughput with 0 and with N viewers, one run.

One ``carpool serve`` process (the embedded model, its default dtype, ``--threads`` torch
threads) serves decode-heavy bursts: ``--requests`` concurrent completions of ``--max-tokens``
tokens each (EOS ignored, short prompts), sent with ``httpx`` from this process. Between bursts
the number of open dashboards alternates between 0 and ``--viewers``; each viewer is a thread of
a separate process that reads ``/v1/stats/stream`` and parses every frame as the page does (the
server does all its dashboard work: the taps on the engine thread, the views, one frame per
tick). Throughput is completion tokens / wall time of the burst; the conditions are interleaved
and medians reported, since the machine is shared and noisy.

Usage:
    python benchmarks/dashboard_cost.py --viewers 3 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

VIEWERS = """
import json, sys, threading, httpx
url, n = sys.argv[1], int(sys.argv[2])
counts = [0] * n
def view(i):
    with httpx.stream("GET", url + "/v1/stats/stream", timeout=None) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                counts[i] += 1
for i in range(n):
    threading.Thread(target=view, args=(i,), daemon=True).start()
sys.stdin.read()  # until the benchmark closes our stdin
print(json.dumps(counts), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int, max_num_seqs: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-c", "from carpool.cli import main; main()", "serve", "--port",
        str(port), "--max-num-seqs", str(max_num_seqs), "--log-interval", "3600",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def burst(url: str, requests: int, max_tokens: int) -> float:
    """Completion tokens per second of one burst of concurrent requests."""

    def one(i: int) -> int:
        body = {"model": "carpool-default", "prompt": f"Story {i}:", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", type=int, default=3, help="dashboards open in the 'on' runs")
    ap.add_argument("--repeats", type=int, default=5, help="bursts per condition (interleaved)")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests per burst")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/dashboard_cost.json"))
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.threads, args.requests)
    results: dict[str, list[float]] = {"none": [], f"{args.viewers} dashboards": []}
    frames: list[int] = []
    try:
        burst(url, args.requests, 8)  # warm-up
        for _ in range(args.repeats):
            results["none"].append(burst(url, args.requests, args.max_tokens))
            viewers = subprocess.Popen(
                [sys.executable, "-c", VIEWERS, url, str(args.viewers)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # connected, first frames built
            rate = burst(url, args.requests, args.max_tokens)
            results[f"{args.viewers} dashboards"].append(rate)
            out, _ = viewers.communicate("", timeout=30)
            frames.extend(json.loads(out.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait(30)

    medians = {k: statistics.median(v) for k, v in results.items()}
    on = medians[f"{args.viewers} dashboards"]
    ratio = on / medians["none"]
    summary = {
        "threads": args.threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "viewers": args.viewers,
        "tokens_per_s": results,
        "median_tokens_per_s": medians,
        "ratio_with_dashboards": ratio,
        "frames_received_per_viewer": frames,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"decode tokens/s median of {args.repeats}: none {medians['none']:.1f}, "
        f"{args.viewers} dashboards {on:.1f} (ratio {ratio:.3f}, {100 * (ratio - 1):+.1f}%); "
        f"frames per viewer per burst {min(frames)}-{max(frames)}"
    )


if __name__ == "__main__":
    main()

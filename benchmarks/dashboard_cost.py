"""What open dashboards cost the engine: decode throughput with 0 and with N viewers, one run.

One ``carpool serve`` process (the embedded model, its default dtype, ``--threads`` torch
threads) serves decode-heavy bursts: ``--requests`` concurrent completions of ``--max-tokens``
tokens each (EOS ignored, short prompts), sent with ``httpx`` from this process. Between bursts
the number of open dashboards alternates between 0 and ``--viewers``; each viewer is a thread of
a separate process that reads ``/v1/stats/stream`` and parses every frame as the page does (the
server does all its dashboard work: the taps on the engine thread, the views, one frame per
tick). Throughput is completion tokens / wall time of the burst; the conditions are interleaved
(ABBA: each pair's order flips) and medians reported, since the machine is shared and noisy.
The viewers run at ``nice 19``: they stand for browsers on other machines, and on a 2-core box
their JSON parsing would otherwise take CPU from the server. Besides tokens/s, the server
process's own CPU time per generated token (``/proc/PID/stat``) is compared, per pair (the
primary figure: it shows the server-side cost even when other jobs share the machine), and
split into the main thread (uvicorn's event loop: HTTP, the frame ticks, the SSE sends) and
the rest (the engine thread, torch's threads). Pair ratios are summarised by their median,
quartiles and a trimmed mean (the lowest and highest fifth left out).

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
import json, os, sys, threading, httpx
os.nice(19)  # viewers stand for browsers on other machines: they yield this box's CPU
url, n = sys.argv[1], int(sys.argv[2])
counts, sizes = [0] * n, [0] * n
first = threading.Barrier(n + 1)
def view(i):
    with httpx.stream("GET", url + "/v1/stats/stream", timeout=None) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                counts[i] += 1
                sizes[i] += len(line) - 6
                if counts[i] == 1:
                    first.wait()
for i in range(n):
    threading.Thread(target=view, args=(i,), daemon=True).start()
first.wait()
print("ready", flush=True)  # every viewer has its first frame: the burst may start
sys.stdin.read()  # until the benchmark closes our stdin
print(json.dumps([counts, sizes]), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    port: int, threads: int, max_num_seqs: int, fps: float, model: str
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-c", "from carpool.cli import main; main()", "serve", "--port",
        str(port), "--max-num-seqs", str(max_num_seqs), "--log-interval", "3600",
        "--dashboard-fps", str(fps),
    ]  # fmt: skip
    if model != "default":  # "default": what `carpool serve` serves without --model
        cmd += ["--model", model]
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


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads), or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spread(ratios: list[float]) -> dict[str, float]:
    """Median, quartiles and trimmed mean (a fifth left out at each end) of pair ratios."""
    r = sorted(ratios)
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    cut = len(r) // 5
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2],
            "trimmed_mean": statistics.fmean(r[cut : len(r) - cut])}  # fmt: skip


def burst(url: str, requests: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one burst of concurrent requests."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def one(i: int) -> int:
        body = {"model": model, "prompt": f"Story {i}:", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", type=int, default=3, help="dashboards open in the 'on' runs")
    ap.add_argument("--repeats", type=int, default=5, help="bursts per condition (interleaved)")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests per burst")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--fps", type=float, default=10.0, help="the server's --dashboard-fps")
    ap.add_argument(
        "--model", default="embedded",
        help="the server's --model ('default' = no flag, i.e. the real default model)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/dashboard_cost.json"))
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.threads, args.requests, args.fps, args.model)
    off, on_key = "none", f"{args.viewers} dashboards"
    results: dict[str, list[float]] = {off: [], on_key: []}
    cpu_ms: dict[str, list[float]] = {off: [], on_key: []}  # server CPU ms per token
    loop_ms: dict[str, list[float]] = {off: [], on_key: []}  # of it, the main thread's
    frames: list[int] = []
    frame_bytes: list[float] = []

    def measure(key: str) -> None:
        viewers = None
        if key == on_key:
            viewers = subprocess.Popen(
                [sys.executable, "-c", VIEWERS, url, str(args.viewers)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert viewers.stdout is not None
            assert viewers.stdout.readline().strip() == "ready"  # all connected and served
        cpu, loop = cpu_seconds(server.pid), cpu_seconds(server.pid, server.pid)
        seconds, tokens = burst(url, args.requests, args.max_tokens)
        cpu_ms[key].append(1000 * (cpu_seconds(server.pid) - cpu) / tokens)
        loop_ms[key].append(1000 * (cpu_seconds(server.pid, server.pid) - loop) / tokens)
        results[key].append(tokens / seconds)
        if viewers is not None:
            out, _ = viewers.communicate("", timeout=30)
            counts, sizes = json.loads(out.strip().splitlines()[-1])
            frames.extend(counts)
            frame_bytes.extend(b / max(1, n) for n, b in zip(counts, sizes, strict=True))

    try:
        burst(url, args.requests, 8)  # warm-up
        for i in range(args.repeats):
            for key in (off, on_key) if i % 2 == 0 else (on_key, off):
                measure(key)
    finally:
        server.terminate()
        server.wait(30)

    medians = {k: statistics.median(v) for k, v in results.items()}
    on = medians[on_key]
    ratio = on / medians[off]
    # Per pair (adjacent bursts, so slow drifts of the machine cancel); the spread of the pair
    # ratios says how far the median can be trusted on a noisy box.
    tps = spread([b / a for a, b in zip(results[off], results[on_key], strict=True)])
    cpu_pairs = spread([b / a for a, b in zip(cpu_ms[off], cpu_ms[on_key], strict=True)])
    pair_ratio, quartiles = tps["median"], [tps["q1"], tps["median"], tps["q3"]]
    cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}
    loop = {k: statistics.median(v) for k, v in loop_ms.items()}
    summary = {
        "threads": args.threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "viewers": args.viewers,
        "dashboard_fps": args.fps,
        "tokens_per_s": results,
        "median_tokens_per_s": medians,
        "ratio_with_dashboards": ratio,
        "model": args.model,
        "median_pair_ratio": pair_ratio,
        "pair_ratio_quartiles": [quartiles[0], quartiles[2]],
        "server_cpu_ms_per_token": cpu_ms,
        "median_server_cpu_ms_per_token": cpu,
        "server_cpu_per_token_pair_ratio": cpu_pairs,
        "tokens_per_s_pair_ratio": tps,
        "main_thread_cpu_ms_per_token": loop_ms,
        "median_main_thread_cpu_ms_per_token": loop,
        "frames_received_per_viewer": frames,
        "mean_frame_bytes_per_viewer": frame_bytes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"server CPU per token, {on_key} / none, {args.repeats} pairs: median "
        f"{cpu_pairs['median']:.3f} (quartiles {cpu_pairs['q1']:.3f}-{cpu_pairs['q3']:.3f}, "
        f"trimmed mean {cpu_pairs['trimmed_mean']:.3f}); ms/token none {cpu[off]:.3f}, "
        f"{on_key} {cpu[on_key]:.3f} (main thread {loop[off]:.3f} -> {loop[on_key]:.3f})\n"
        f"decode tokens/s median: none {medians[off]:.1f}, {on_key} {on:.1f} (ratio "
        f"{ratio:.3f}, median pair ratio {pair_ratio:.3f}, quartiles {quartiles[0]:.3f}-"
        f"{quartiles[2]:.3f}, trimmed mean {tps['trimmed_mean']:.3f}); frames per viewer per "
        f"burst {min(frames)}-{max(frames)}, {statistics.fmean(frame_bytes):.0f} bytes each"
    )


if __name__ == "__main__":
    main()

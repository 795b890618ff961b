"""A/B of ``carpool serve`` across checkouts (or thread counts): rounds alternated, one server at
a time, each loaded by the same ``carpool bench serve`` command.

Each side is ``NAME=TREE[:THREADS]``: the server runs ``TREE/src``'s carpool (``PYTHONPATH``, so
a second worktree measures its own code) with ``--threads THREADS`` (default 2). Every round
starts and stops every side's server in turn, so a busy machine's phases hit all of them alike.
The bench summaries go to ``{output}_{NAME}_{round}.json`` and the medians are printed; each
server's log to ``$TMPDIR/ab_serve_{NAME}.log``.

::

    git worktree add -f /tmp/before <commit>
    python benchmarks/ab_serve.py --side before=/tmp/before --side after=. --rounds 2 \\
        --output benchmarks/results/serve_x -- --num-prompts 32 --prompt-len 64 --gen-len 128 \\
        --max-concurrency 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from serve_util import CARPOOL, bench_serve, free_port, start_server, stop_server


def _side(text: str) -> tuple[str, Path, int]:
    name, _, rest = text.partition("=")
    tree, _, threads = rest.partition(":")
    if not name or not tree:
        raise argparse.ArgumentTypeError(f"expected NAME=TREE[:THREADS], got {text!r}")
    return name, Path(tree).resolve(), int(threads or 2)


def run_side(name: str, tree: Path, threads: int, bench_args: list[str], output: Path) -> dict:
    """One server of ``tree`` on a free port, one bench run against it; the bench's summary."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [*CARPOOL, "serve", "--port", str(port)]
    # The server's log: beside the system's temporary files, not the results.
    log = Path(tempfile.gettempdir()) / f"ab_serve_{name}.log"
    server = start_server([*cmd, "--threads", str(threads)], url, log, env)
    try:
        return bench_serve(url, bench_args, output)
    finally:
        stop_server(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=_side, action="append", required=True, help="NAME=TREE[:N]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output", type=Path, required=True, help="prefix of the JSON files")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then carpool bench serve's")
    args = p.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in args.side}
    for r in range(1, args.rounds + 1):
        for name, tree, threads in args.side:
            out = Path(f"{args.output}_{name}_{r}.json")
            res = run_side(name, tree, threads, bench_args, out)
            results[name].append(res)
            print(
                f"round {r} {name}: {res['duration_s']:.2f} s, {res['output_throughput']:.1f}"
                f" tok/s, TPOT p50 {res['tpot_ms']['p50']:.1f} ms,"
                f" TTFT p50 {res['ttft_ms']['p50']:.1f} ms",
                flush=True,
            )
    for name, runs in results.items():
        dur = statistics.median(x["duration_s"] for x in runs)
        tpot = statistics.median(x["tpot_ms"]["p50"] for x in runs)
        print(f"{name}: median duration {dur:.2f} s, TPOT p50 {tpot:.1f} ms")


if __name__ == "__main__":
    main()

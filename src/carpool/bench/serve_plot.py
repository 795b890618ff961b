"""The plot of ``carpool bench serve --plot``: latency percentiles and throughput over time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carpool.bench.plotting import pyplot
from carpool.bench.serve_load import RequestResult

_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E"))


def throughput_over_time(
    results: Sequence[RequestResult], duration: float, bins: int = 20
) -> tuple[list[float], list[float], list[float]]:
    """Bin ends (s), completed requests/s and output tokens/s per bin (by each end time)."""
    width = max(duration, 1e-9) / bins
    reqs, toks = [0.0] * bins, [0.0] * bins
    for r in results:
        if r.ok and r.end is not None:
            i = min(bins - 1, int(r.end / width))
            reqs[i] += 1 / width
            toks[i] += r.output_tokens / width
    return [width * (i + 1) for i in range(bins)], reqs, toks


def write_serve_plot(
    path: Path, results: Sequence[RequestResult], summary: dict[str, Any], title: str
) -> bool:
    """Left: p50/p90/p99 of TTFT, TPOT, ITL and end-to-end latency; right: throughput over time.

    Returns:
        False (with a warning) when matplotlib is missing.
    """
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for k, q in enumerate(("p50", "p90", "p99")):
        values = [summary[key][q] for key, _ in _METRICS]
        values = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax1.bar([i + (k - 1) * width for i in range(len(_METRICS))], values, width, label=q)
    ax1.set_xticks(range(len(_METRICS)), [name for _, name in _METRICS])
    ax1.set_ylabel("ms")
    ax1.set_yscale("symlog")
    ax1.set_title("latency percentiles")
    ax1.legend(fontsize=8)
    t, reqs, toks = throughput_over_time(results, summary["duration_s"])
    ax2.plot(t, toks, "o-", label="output tokens/s")
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("output tokens/s")
    rps = ax2.twinx()
    rps.plot(t, reqs, "s--", color="tab:red", label="requests/s")
    rps.set_ylabel("completed requests/s", color="tab:red")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.set_title("throughput over time")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Reports of ``carpool bench strategies``: a markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carpool.bench.plotting import pyplot
from carpool.bench.strategies import StrategyResult

_COLUMNS = (
    "strategy",
    "layout",
    "gen tok/s",
    "req/s",
    "TTFT p50 (s)",
    "TTFT p95 (s)",
    "e2e p50 (s)",
    "e2e p95 (s)",
    "e2e p99 (s)",
    "mean batch",
    "padding waste %",
    "peak KV blocks",
)


def markdown_table(results: Sequence[StrategyResult]) -> str:
    """One row per (strategy, layout)."""
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_COLUMNS))) + "|",
    ]
    for r in results:
        cells = [
            r.strategy,
            r.layout,
            f"{r.tokens_per_s:.1f}",
            f"{r.requests_per_s:.2f}",
            f"{r.ttft_p50:.2f}",
            f"{r.ttft_p95:.2f}",
            f"{r.e2e_p50:.2f}",
            f"{r.e2e_p95:.2f}",
            f"{r.e2e_p99:.2f}",
            f"{r.mean_batch_size:.1f}",
            f"{r.padding_waste_pct:.1f}",
            str(r.peak_kv_blocks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: Sequence[StrategyResult], meta: dict[str, Any]) -> None:
    """``meta`` (command, workload, engine) plus every result's metrics."""
    payload = {**meta, "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_plot(path: Path, results: Sequence[StrategyResult], title: str) -> bool:
    """Throughput against p95 end-to-end latency, one point per (strategy, layout).

    Returns:
        False (and logs why) when matplotlib is not installed (``pip install carpool[plot]``).
    """
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"ragged": "o", "padded": "s"}
    strategies = list(dict.fromkeys(r.strategy for r in results))
    colors = {s: f"C{i}" for i, s in enumerate(strategies)}
    for r in results:
        ax.scatter(
            r.e2e_p95,
            r.tokens_per_s,
            marker=markers.get(r.layout, "x"),
            color=colors[r.strategy],
            s=60,
        )
        ax.annotate(
            f"{r.strategy}/{r.layout}",
            (r.e2e_p95, r.tokens_per_s),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("end-to-end latency p95 (s)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

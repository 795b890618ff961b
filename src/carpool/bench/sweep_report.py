"""Reports of the batch-size sweep: a markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carpool.bench.plotting import pyplot
from carpool.bench.probes import Roofline
from carpool.bench.sweep import SweepRow

# (header, SweepRow field, format): llama.cpp batched-bench's columns, then ours.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("PP", "pp", "d"),
    ("TG", "tg", "d"),
    ("B", "b", "d"),
    ("N_KV", "n_kv", "d"),
    ("T_PP s", "t_pp", ".3f"),
    ("S_PP t/s", "s_pp", ".1f"),
    ("T_TG s", "t_tg", ".3f"),
    ("S_TG t/s", "s_tg", ".1f"),
    ("T s", "t", ".3f"),
    ("S t/s", "s", ".1f"),
    ("lat mean ms", "latency_mean_ms", ".1f"),
    ("lat p95 ms", "latency_p95_ms", ".1f"),
    ("speedup", "speedup_vs_b1", ".2f"),
    ("eff", "efficiency", ".2f"),
    ("TG GFLOP/s", "tg_gflops", ".1f"),
    ("TG %peak", "tg_flops_frac", ".1%"),
    ("TG GB/s", "tg_gbs", ".1f"),
    ("TG %BW", "tg_bw_frac", ".1%"),
    ("PP %peak", "pp_flops_frac", ".1%"),
    ("bound", "bound", "s"),
)


def markdown_table(rows: Sequence[SweepRow]) -> str:
    """One line per batch size; T_PP, T_TG and T are per round (B requests)."""
    lines = [
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---:" if f != "s" else "---" for _, _, f in COLUMNS) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(format(getattr(r, a), f) for _, a, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, rows: Sequence[SweepRow], roof: Roofline, meta: dict[str, Any]) -> None:
    """``meta`` (command, model, workload), the measured roofline and every row."""
    payload = {**meta, "roofline": roof.to_dict(), "results": [r.to_dict() for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_plot(path: Path, rows: Sequence[SweepRow], title: str) -> bool:
    """Throughput and latency vs batch size, and the fraction of each roof reached.

    Returns:
        False (with a warning) when matplotlib is missing.
    """
    plt = pyplot()
    if plt is None:
        return False
    b = [r.b for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(b, [r.s_tg for r in rows], "o-", label="decode S_TG (tok/s)")
    ax1.plot(b, [r.s_pp for r in rows], "s--", label="prefill S_PP (tok/s)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("tokens/s")
    lat = ax1.twinx()
    lat.plot(b, [r.latency_mean_ms for r in rows], "^:", color="tab:red", label="ms/token")
    lat.set_ylabel("decode latency per token (ms)", color="tab:red")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("throughput and latency")
    ax2.plot(b, [100 * r.tg_bw_frac for r in rows], "o-", label="decode % of bandwidth")
    ax2.plot(b, [100 * r.tg_flops_frac for r in rows], "s-", label="decode % of matmul peak")
    ax2.plot(b, [100 * r.pp_flops_frac for r in rows], "d--", label="prefill % of matmul peak")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("% of measured roof")
    ax2.legend(fontsize=8)
    ax2.set_title("roofline")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Markdown tables of a peers run (``run.py``'s JSON), also usable on a saved file:

python benchmarks/peers/report.py benchmarks/results/peers.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _median(runs: Sequence[Mapping[Any, float]], batch: int) -> float | None:
    values = [r[b] for r in runs for b in r if int(b) == batch]
    return statistics.median(values) if values else None


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def _family(m: Mapping[str, Any]) -> str:
    """`` family F model M`` where the run recorded them (runs from 2026-12-04 on)."""
    if m.get("cpu_family") is None:
        return ""
    return f" family {m['cpu_family']} model {m.get('cpu_model')}"


def render(meta: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> str:
    """The decode table (medians, ratios), the prefill table (runs from the twenty-sixth pass of
    issue 11 on record it) and the peak-memory table, with a header line."""
    m = meta["machine"]
    amx = ", ".join(m.get("amx") or []) or "no AMX"
    lines = [
        f"{m.get('model_name')}{_family(m)} ({amx}), {m.get('cpus')} CPUs, {meta['threads']} "
        "threads per "
        f"system; {meta['prompt_len']}-token prompts, {meta['gen_len']} new tokens; decode "
        f"tokens/s, median of {meta['repeats']}; load average {meta['load_avg_start'][0]:.1f} "
        f"at start, {meta['load_avg_end'][0]:.1f} at end.",
        "",
    ]
    hf = {r["model"]: r["transformers"] for r in results if "transformers" in r}
    files = [r for r in results if r["file"] != "hf"]
    lines += _speeds(meta, files, hf, "runs")
    if any("prefill_runs" in r.get(s, {}) for r in results for s in ("carpool", "llama.cpp")):
        lines += ["", "Prefill tokens/s (every prompt to its first token's logits), medians:", ""]
        lines += _speeds(meta, files, hf, "prefill_runs")
    lines += [
        "",
        "Peak resident memory (MiB, whole process, largest batch included):",
        "",
        "| model | weights | carpool | llama.cpp | carpool / llama.cpp | transformers bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in files:
        cp = r["carpool"]["rss_mib"] if "carpool" in r else None
        ll = r["llama.cpp"]["rss_mib"] if "llama.cpp" in r else None
        tf = hf[r["model"]]["rss_mib"] if r["model"] in hf else None
        lines.append(
            f"| {r['model']} | {r['file']} | {_num(cp)} | {_num(ll)} | {_ratio(cp, ll)} "
            f"| {_num(tf)} |"
        )
    return "\n".join(lines)


def _speeds(
    meta: Mapping[str, Any],
    files: Sequence[Mapping[str, Any]],
    hf: Mapping[str, Mapping[str, Any]],
    key: str,
) -> list[str]:
    """One speed table: each system's medians of ``key`` (``runs``: decode, ``prefill_runs``)
    and the ratios."""

    def median(system: Mapping[str, Any] | None, b: int) -> float | None:
        return _median(system[key], b) if system is not None and key in system else None

    lines = [
        "| model | weights | batch | carpool | llama.cpp | carpool / llama.cpp "
        "| transformers bf16 | carpool / transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in files:
        for b in meta["batch_sizes"]:
            cp = median(r.get("carpool"), b)
            ll = median(r.get("llama.cpp"), b)
            tf = median(hf.get(r["model"]), b)
            weights = r["file"] + (f" (carpool {r['carpool']['dtype']})" if "carpool" in r else "")
            lines.append(
                f"| {r['model']} | {weights} | {b} | {_num(cp)} | {_num(ll)} | {_ratio(cp, ll)} "
                f"| {_num(tf)} | {_ratio(cp, tf)} |"
            )
    return lines


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(render(data["meta"], data["results"]))

"""What ``carpool bench serve`` reports from the results of a load: latency percentiles,
throughput and goodput (the share of requests that meet every ``--goodput`` target)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from carpool.bench.serve_load import RequestResult

# Latency targets understood by ``--goodput`` (milliseconds).
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(text: str) -> dict[str, float]:
    """``"ttft:500,tpot:50"`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds).

    Raises:
        ValueError: an unknown metric or a value that is not a positive number.
    """
    targets: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition(":")
        if name not in GOODPUT_METRICS:
            raise ValueError(f"goodput metric {name!r} unknown; choose from {GOODPUT_METRICS}")
        try:
            targets[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput {name}: {value!r} is not a number of ms") from None
        if not targets[name] > 0:
            raise ValueError(f"goodput {name}: must be > 0 ms, got {value}")
    return targets


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _tpot(r: RequestResult) -> float | None:
    """Time per output token after the first (s), vLLM's definition."""
    if r.ttft is None or r.output_tokens < 2:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = [v * 1e3 for v in values]
    return {
        "mean": sum(ms) / len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


def summarize(
    results: Sequence[RequestResult], duration: float, goodput: dict[str, float] | None = None
) -> dict[str, Any]:
    """Throughput, latency percentiles (ms), failures by kind and goodput."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    tpots = [t for t in (_tpot(r) for r in ok) if t is not None]
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures": dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        "duration_s": duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(prompt_tokens) if prompt_tokens else None,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]),
        "e2el_ms": _stats_ms([r.latency for r in ok]),
    }
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    if cached and prompt_tokens:
        summary["total_cached_tokens"] = sum(cached)
        summary["prefix_cache_hit_rate"] = sum(cached) / max(1, sum(prompt_tokens))
    classes = sorted({r.priority for r in results if r.priority is not None})
    if classes:
        summary["by_priority"] = {
            str(c): {
                "completed": sum(1 for r in ok if r.priority == c),
                "ttft_ms": _stats_ms(
                    [r.ttft for r in ok if r.priority == c and r.ttft is not None]
                ),
                "e2el_ms": _stats_ms([r.latency for r in ok if r.priority == c]),
            }
            for c in classes
        }
    if goodput:
        good = sum(1 for r in ok if _meets(r, goodput))
        summary["goodput_targets_ms"] = goodput
        summary["good_requests"] = good
        summary["goodput"] = good / duration if duration > 0 else 0.0
    return summary


def _meets(r: RequestResult, targets: dict[str, float]) -> bool:
    """True when every target (ms) is met; a TPOT target is met by a one-token answer."""
    values = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2el": r.latency}
    return all(values[k] is not None and values[k] * 1e3 <= v for k, v in targets.items())

"""``carpool bench strategies``: one workload through every batching strategy and layout.

For each (strategy, layout) a fresh engine warms up, then serves the workload: requests are
added when the engine clock passes their arrival time, and when no step can run the loop sleeps
until the next arrival or the policy's ``wake_time`` (no polling). The metrics come from each
request's timestamps and the engine's per-step records:

- generated tokens/s and requests/s over the run's makespan (first arrival to last release);
- TTFT and end-to-end latency percentiles (from arrival, so queueing counts);
- mean batch size: requests computing real tokens per step;
- padding waste: pad token slots / all token slots computed (0 for the ragged layout);
- peak KV blocks in use.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from carpool.bench.workloads import BenchRequest
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.engine.stats import StepRecord
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams


@dataclass(frozen=True)
class StrategyResult:
    """The metrics of one (strategy, layout) run (times in seconds)."""

    strategy: str
    layout: str
    num_requests: int
    generated_tokens: int
    makespan: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50: float
    ttft_p95: float
    e2e_p50: float
    e2e_p95: float
    e2e_p99: float
    mean_queue_wait: float
    mean_inter_token: float
    mean_batch_size: float
    padding_waste_pct: float
    peak_kv_blocks: int
    num_steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def drive(
    engine: LLMEngine,
    requests: Sequence[BenchRequest],
    id_prefix: str = "b",
    on_finish: Callable[[RequestOutput], None] | None = None,
) -> tuple[dict[str, RequestOutput], float, float]:
    """Serve ``requests`` with simulated arrivals until every one is released.

    Returns:
        The final output of each request (by id ``f"{id_prefix}{index}"``), and the engine-clock
        start and end of the run.
    """
    clock = engine.clock
    pending = deque(sorted(enumerate(requests), key=lambda ir: ir[1].arrival))
    finished: dict[str, RequestOutput] = {}
    t0 = clock()
    while pending or engine.has_unfinished():
        now = clock()
        while pending and t0 + pending[0][1].arrival <= now:
            i, r = pending.popleft()
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            engine.add_request(r.prompt_token_ids, params, f"{id_prefix}{i}", t0 + r.arrival)
        steps = engine.stats.steps
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
                if on_finish is not None:
                    on_finish(out)
        if engine.stats.steps == steps:
            # Nothing ran: sleep until the next arrival or the policy's timer, whichever first.
            wakes = [t0 + pending[0][1].arrival] if pending else []
            policy_wake = engine.next_wake_time()
            if policy_wake is not None:
                wakes.append(policy_wake)
            if wakes:
                delay = min(wakes) - clock()
                if delay > 0:
                    time.sleep(delay)
    return finished, t0, clock()


def summarize(
    strategy: str,
    layout: str,
    outputs: dict[str, RequestOutput],
    records: Sequence[StepRecord],
    makespan: float,
) -> StrategyResult:
    """Compute the metrics of one run from its outputs and step records."""
    timings = [o.timings[0] for o in outputs.values()]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    ttft = [t.ttft for t in timings if t.ttft is not None]
    e2e = [t.e2e for t in timings if t.e2e is not None]
    waits = [t.queue_wait for t in timings if t.queue_wait is not None]
    gaps = [g for t in timings for g in t.inter_token_gaps]
    real = sum(r.num_tokens for r in records)
    padded = sum(r.num_padded_tokens for r in records)
    return StrategyResult(
        strategy=strategy,
        layout=layout,
        num_requests=len(outputs),
        generated_tokens=generated,
        makespan=makespan,
        tokens_per_s=generated / makespan,
        requests_per_s=len(outputs) / makespan,
        ttft_p50=_pct(ttft, 50),
        ttft_p95=_pct(ttft, 95),
        e2e_p50=_pct(e2e, 50),
        e2e_p95=_pct(e2e, 95),
        e2e_p99=_pct(e2e, 99),
        mean_queue_wait=statistics.fmean(waits) if waits else float("nan"),
        mean_inter_token=statistics.fmean(gaps) if gaps else float("nan"),
        mean_batch_size=statistics.fmean(r.num_seqs for r in records) if records else 0.0,
        padding_waste_pct=100.0 * padded / (real + padded) if real + padded else 0.0,
        peak_kv_blocks=max((r.kv_blocks_in_use for r in records), default=0),
        num_steps=len(records),
    )


def warmup_requests(requests: Sequence[BenchRequest], n: int) -> list[BenchRequest]:
    """``n`` short copies of the workload's first prompts, all arriving at once."""
    return [BenchRequest(r.prompt_token_ids, min(r.max_tokens, 4), 0.0) for r in list(requests)[:n]]


def run_strategy(
    base: EngineConfig,
    strategy: str,
    layout: str,
    requests: Sequence[BenchRequest],
    warmup: int = 4,
    on_finish: Callable[[RequestOutput], None] | None = None,
) -> StrategyResult:
    """Serve ``requests`` on a fresh engine with ``strategy`` and ``layout``."""
    engine = LLMEngine(replace(base, batching=strategy, layout=layout))
    if warmup:
        drive(engine, warmup_requests(requests, warmup), id_prefix="warm")
    first = len(engine.stats.records)
    outputs, t0, t1 = drive(engine, requests, on_finish=on_finish)
    assert len(outputs) == len(requests), f"{len(outputs)} of {len(requests)} requests finished"
    records = list(engine.stats.records)[first:]
    return summarize(strategy, layout, outputs, records, t1 - t0)


def median_result(results: Sequence[StrategyResult]) -> StrategyResult:
    """The per-metric median of repeated runs of one (strategy, layout)."""
    first = results[0]
    fields: dict[str, Any] = {}
    for key, value in first.to_dict().items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            med = statistics.median(getattr(r, key) for r in results)
            fields[key] = type(value)(med) if isinstance(value, int) else med
        else:
            fields[key] = value
    return StrategyResult(**fields)

"""``FrameBuilder``: what one frame of the live dashboard holds, built from an engine's taps.

The builder is an ``EngineTap``: each engine iteration (``IterationEvent``) appends its step
record, its finished requests and, every ``view_interval``, its ``EngineView`` to bounded
deques (quick, under a lock: it runs on the engine thread in-process). ``frame()`` then turns
them into one JSON-ready dict; the broadcaster calls it at most ten times a second whatever the
number of viewers, so viewers cost the engine nothing but the taps.

A frame holds: the policy, layout and limits in force; a verdict (decode-bound, prefill-bound,
queueing, idle) with its reason; the latest steps (decode, prefill and pad tokens, batch size,
preemptions); throughput and TTFT / inter-token / end-to-end percentiles over a sliding window;
KV usage and the queue over time; every unfinished request (state, progress, blocks, priority);
the recently finished ones; the KV block map per engine; one lane per replica.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot
from carpool.engine.view import EngineView, IterationEvent

MAX_STEPS = 240  # steps drawn on the timeline
MAX_FINISHED = 12  # finished requests listed
MAX_CELLS = 2048  # KV map cells per engine; beyond, one cell stands for several blocks
WINDOW_S = 10.0  # throughput and latency percentiles over this sliding window
HISTORY_S = 60.0  # KV usage / queue history shown
VERDICT_S = 3.0  # the verdict looks at this much recent time

FREE, CACHED = -1, -2  # KV map cell values besides an index into ``requests`` (run-length
# encoded in the frame: ``[[value, count], ...]``)


@dataclass
class _Totals:
    """Counters since the builder started; rates are their differences between frame ticks,
    so a frame never walks more than the ``MAX_STEPS`` steps it draws."""

    steps: int = 0
    decode: int = 0
    prefill: int = 0
    pad: int = 0
    sampled: int = 0

    def copy(self) -> _Totals:
        return _Totals(self.steps, self.decode, self.prefill, self.pad, self.sampled)


@dataclass(frozen=True)
class _Finished:
    end: float
    request_id: str
    replica: int
    prompt_tokens: int
    generated: int
    ttft: float | None
    e2e: float | None
    reason: str


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 (nearest rank) of ``values``, None for each when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


class FrameBuilder:
    """Collects engine iterations; builds dashboard frames (an ``EngineTap``).

    Args:
        config: the engine configuration in force.
        limits: the model's limits (per engine: every replica loads the same model).
        snapshot: the client's current totals (``EngineClient.snapshot``).
        describe: the client's per-engine lanes (``EngineClient.describe``).
        view_interval: seconds between the ``EngineView``s asked of the engines.
        clock: the engines' clock (``time.monotonic``).
    """

    def __init__(
        self,
        config: EngineConfig,
        limits: ModelLimits,
        snapshot: Callable[[], EngineSnapshot],
        describe: Callable[[], list[dict[str, Any]]],
        view_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.limits = limits
        self.snapshot = snapshot
        self.describe = describe
        self.view_interval = view_interval
        self.clock = clock
        self._lock = threading.Lock()
        # [seq, replica, decode, prefill, pad, batch, preempted]: as the frame sends them (ints
        # only: JSON-encoding floats is most of a frame's cost)
        self._steps: deque[list[float]] = deque(maxlen=MAX_STEPS)
        self._totals = _Totals()
        self._marks: deque[tuple[float, _Totals]] = deque()  # (frame time, totals then)
        self._finished: deque[_Finished] = deque(maxlen=512)
        self._gaps: deque[tuple[float, float]] = deque(maxlen=2048)  # (end, inter-token gap)
        self._latency: tuple[float, int, dict[str, Any]] = (float("-inf"), 0, {})
        self._num_finished = 0
        self._encoded: deque[str] = deque(maxlen=MAX_STEPS)  # step rows as JSON (frame_json)
        self._last_encoded = 0
        self._views: dict[int, EngineView] = {}
        self._snapshots: dict[int, EngineSnapshot] = {}
        self._history: deque[tuple[float, float, int, int]] = deque()  # t, usage, run, wait
        self._routed: deque[tuple[float, int, str]] = deque(maxlen=64)  # t, replica, id
        self._seen: dict[str, int] = {}  # request id -> replica (routing, bounded below)

    # ---- the tap (engine thread or event loop) ----------------------------------------------

    def on_iteration(self, event: IterationEvent) -> None:
        """Keep what the frame needs of one engine iteration (bounded, O(finished))."""
        now = self.clock()
        with self._lock:
            self._snapshots[event.replica] = event.snapshot
            rec = event.record
            if rec is not None:
                t = self._totals
                decode = rec.num_tokens - rec.num_prefill_tokens
                t.steps += 1
                t.decode += decode
                t.prefill += rec.num_prefill_tokens
                t.pad += rec.num_padded_tokens
                t.sampled += rec.num_sampled
                self._steps.append(
                    [t.steps, event.replica, decode, rec.num_prefill_tokens,
                     rec.num_padded_tokens, rec.num_seqs, rec.num_preempted]
                )  # fmt: skip
            if event.view is not None:
                self._views[event.replica] = event.view
                for r in event.view.requests:
                    self._note_routed(r.request_id.split("#")[0], event.replica, now)
            for out, reason in event.finished:
                self._num_finished += 1
                self._note_routed(out.request_id, event.replica, now)
                t = out.timings[0] if out.timings else None
                self._finished.append(
                    _Finished(
                        end=now,
                        request_id=out.request_id,
                        replica=event.replica,
                        prompt_tokens=len(out.prompt_token_ids),
                        generated=out.num_generated_tokens,
                        ttft=t.ttft if t is not None else None,
                        e2e=t.e2e if t is not None else None,
                        reason=reason,
                    )
                )
                for timing in out.timings:
                    self._gaps.extend((now, g) for g in timing.inter_token_gaps[-256:])

    def _note_routed(self, request_id: str, replica: int, now: float) -> None:
        if request_id in self._seen:
            return
        self._seen[request_id] = replica
        self._routed.append((now, replica, request_id))
        if len(self._seen) > 4096:  # forget the oldest half (dicts keep insertion order)
            for rid in list(self._seen)[:2048]:
                del self._seen[rid]

    # ---- the frame (event loop) -------------------------------------------------------------

    def frame_json(self) -> str:
        """One frame as JSON text. The step rows, most of a frame, are encoded once each and
        kept (event loop only), since a frame repeats the latest ``MAX_STEPS`` of them."""
        frame = self.frame(with_steps=False)
        steps = frame.pop("steps")
        encoded = self._encoded
        for row in steps:
            if row[0] > self._last_encoded:
                encoded.append(json.dumps(row, separators=(",", ":")))
                self._last_encoded = row[0]
        text = json.dumps(frame, separators=(",", ":"))
        return f'{text[:-1]},"steps":[{",".join(encoded)}]}}'

    def frame(self, with_steps: bool = True) -> dict[str, Any]:
        """One dashboard frame (JSON-ready); ``with_steps=False`` leaves the rows for
        ``frame_json`` to splice in (the key then holds only the rows it has not seen)."""
        now = self.clock()
        with self._lock:
            steps = (
                list(self._steps)
                if with_steps
                else [r for r in self._steps if r[0] > self._last_encoded]
            )
            totals = self._totals.copy()
            views = dict(self._views)
            snaps = dict(self._snapshots)
            routed = list(self._routed)
            finished = list(self._finished)[-MAX_FINISHED:]
        total = self.snapshot()
        self._record_history(now, total)
        self._marks.append((now, totals))
        while now - self._marks[0][0] > max(WINDOW_S, VERDICT_S):
            self._marks.popleft()
        window, before = self._since(now, WINDOW_S)
        lanes = self._lanes(routed, now)
        requests, kv = self._requests_and_kv([x["replica"] for x in lanes], views, snaps, now)
        return {
            "time": now,
            "config": self._config(len(lanes)),
            "verdict": self._verdict(totals, total, now),
            "totals": {
                "running": total.num_running,
                "waiting": total.num_waiting,
                "kv_used_blocks": total.num_blocks - total.num_free_blocks,
                "num_blocks": total.num_blocks,
                "kv_usage": total.kv_cache_usage,
                "preemptions": total.num_preemptions,
                "steps": totals.steps,
                "mean_batch_size": total.mean_batch_size,
            },
            "steps": steps,
            "rates": {
                "window_s": WINDOW_S,
                "generation_tps": (totals.sampled - before.sampled) / window if window else 0.0,
                "prefill_tps": (totals.prefill - before.prefill) / window if window else 0.0,
                "steps_per_s": (totals.steps - before.steps) / window if window else 0.0,
                **self._latencies(now),
            },
            # [tenths of a second ago, KV use in permille, running, waiting]
            "history": [
                [round(10 * (t - now)), round(1000 * u), r, w] for t, u, r, w in self._history
            ],
            "requests": requests,
            "finished": [
                {
                    "id": f.request_id,
                    "replica": f.replica,
                    "prompt": f.prompt_tokens,
                    "generated": f.generated,
                    "reason": f.reason,
                    "ttft_ms": _ms1(f.ttft),
                    "e2e_ms": _ms1(f.e2e),
                    "ago_s": round(now - f.end, 1),
                }
                for f in reversed(finished)
            ],  # fmt: skip
            "kv": kv,
            "lanes": lanes,
        }

    def _since(self, now: float, seconds: float) -> tuple[float, _Totals]:
        """(elapsed, totals) at the oldest frame tick within the last ``seconds``."""
        for t, totals in self._marks:
            if now - t <= seconds:
                return now - t, totals
        return 0.0, self._marks[-1][1]

    def _latencies(self, now: float) -> dict[str, Any]:
        """TTFT, inter-token and end-to-end percentiles over the window (sorted again when a
        request finished, or a second later)."""
        when, num_finished, cached = self._latency
        if now - when < 1.0 and num_finished == self._num_finished and cached:
            return cached
        horizon = 3 * WINDOW_S  # finished requests are rarer than steps: a longer window
        with self._lock:
            finished = [f for f in self._finished if now - f.end <= horizon]
            gaps = [g for t, g in self._gaps if now - t <= horizon]
        cached = {
            "ttft_ms": _ms(percentiles([f.ttft for f in finished if f.ttft is not None])),
            "itl_ms": _ms(percentiles(gaps)),
            "e2e_ms": _ms(percentiles([f.e2e for f in finished if f.e2e is not None])),
            "finished_in_window": len(finished),
        }
        self._latency = (now, self._num_finished, cached)
        return cached

    def _record_history(self, now: float, total: EngineSnapshot) -> None:
        h = self._history
        if not h or now - h[-1][0] >= 0.25:  # 4 points a second, whatever the frame rate
            h.append((now, total.kv_cache_usage, total.num_running, total.num_waiting))
        while h and now - h[0][0] > HISTORY_S:
            h.popleft()

    def _config(self, num_replicas: int) -> dict[str, Any]:
        c = self.config
        return {
            "batching": c.batching,
            "layout": c.layout,
            "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens,
            "batch_size": c.batch_size,
            "max_wait_ms": c.max_wait_ms,
            "block_size": c.block_size,
            "max_model_len": self.limits.max_model_len,
            "num_blocks": self.limits.num_blocks,
            "dtype": c.dtype,
            "replicas": num_replicas,
        }

    def _verdict(self, totals: _Totals, total: EngineSnapshot, now: float) -> dict[str, str]:
        """Where the time goes lately: queueing beats prefill-bound beats decode-bound."""
        waits = [w for t, _, _, w in self._history if now - t <= VERDICT_S]
        mean_wait = sum(waits) / len(waits) if waits else 0.0
        if mean_wait >= 1.0 and total.num_waiting > 0:
            why = f"{mean_wait:.1f} requests waited for a seat or KV blocks on average"
            return {"state": "queueing", "why": f"{why} in the last {VERDICT_S:g} s"}
        _, before = self._since(now, VERDICT_S)
        if totals.steps == before.steps:
            return {"state": "idle", "why": f"no forward pass in the last {VERDICT_S:g} s"}
        prefill = totals.prefill - before.prefill
        computed = prefill + totals.decode - before.decode + totals.pad - before.pad
        share = prefill / computed if computed else 0.0
        state = "prefill-bound" if share > 0.5 else "decode-bound"
        why = f"{100 * share:.0f}% of the tokens computed in the last {VERDICT_S:g} s were prompt"
        return {"state": state, "why": why + " tokens"}

    def _requests_and_kv(
        self,
        replicas: list[int],
        views: dict[int, EngineView],
        snaps: dict[int, EngineSnapshot],
        now: float,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every unfinished request, and per engine its KV map (cells index the requests)."""
        requests: list[dict[str, Any]] = []
        kv: list[dict[str, Any]] = []
        for replica in sorted(set(replicas) | set(views)):
            view, snap = views.get(replica), snaps.get(replica)
            num_blocks = view.num_blocks if view is not None else self.limits.num_blocks
            per_cell = max(1, -(-num_blocks // MAX_CELLS))
            cells = [FREE] * (-(-num_blocks // per_cell))
            cached = 0
            if view is not None:
                for block in view.cached_block_ids or ():
                    cells[block // per_cell] = CACHED
                cached = len(view.cached_block_ids or ())
                for r in view.requests:
                    index = len(requests)
                    requests.append(
                        {"id": r.request_id, "replica": replica, "state": r.state,
                         "prompt": r.prompt_tokens, "computed": r.computed_tokens,
                         "generated": r.generated_tokens, "max_tokens": r.max_tokens,
                         "blocks": len(r.block_ids), "priority": r.priority,
                         "waited_s": round(now - r.arrival_time, 2)}
                    )  # fmt: skip
                    for block in r.block_ids:
                        cells[block // per_cell] = index
            used = (snap.num_blocks - snap.num_free_blocks) if snap is not None else 0
            kv.append(
                {"replica": replica, "num_blocks": num_blocks, "blocks_per_cell": per_cell,
                 "cells": run_lengths(cells), "used": used, "cached": cached if view is not None and
                 view.cached_block_ids is not None else None,
                 "block_size": view.block_size if view is not None else self.config.block_size}
            )  # fmt: skip
        return requests, kv

    def _lanes(self, routed: list[tuple[float, int, str]], now: float) -> list[dict[str, Any]]:
        lanes = []
        for lane in self.describe():
            i = lane["replica"]
            recent = [(round(now - t, 1), rid) for t, r, rid in routed if r == i][-12:]
            lanes.append({**lane, "recent": recent})
        return lanes


def run_lengths(cells: list[int]) -> list[list[int]]:
    """``cells`` as ``[value, count]`` runs (a KV map is long runs of free or of one owner)."""
    runs: list[list[int]] = []
    for c in cells:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return runs


def _ms(p: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _ms1(v) for k, v in p.items()}


def _ms1(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)

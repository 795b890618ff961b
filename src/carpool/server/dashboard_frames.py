"""``FrameBuilder``: the live dashboard's frames, built from an engine's taps.

The builder is an ``EngineTap``. On the engine thread (in-process) a tap only queues the
``IterationEvent``: the engine's critical path pays one ``deque.append`` per iteration. Each
frame tick (``tick``, on the event loop, at most ten times a second and only while someone
watches) folds the queued iterations in (step rows, totals, finished requests, the latest
``EngineView`` per engine) and encodes two frames that share their small fields:

- the **delta** frame (every viewer that got the previous tick's frame): the step rows, history
  points and KV cells new since the previous tick, the finished list only when it changed;
- the **keyframe** (``keyframe_json``, built only when a viewer needs one: it just connected, or
  its previous frame was dropped): everything, the latest 240 steps and the whole KV map.

The wire format and how a client merges deltas are in ``dashboard_wire``. What changes little
is encoded once and reused (the config, each engine's requests per view, the finished list, the
step rows, the KV runs); the KV map follows the block tables in numpy arrays (``dashboard_kv``).

A frame holds: the policy, layout and limits in force; a verdict (decode-bound, prefill-bound,
queueing, idle) with its reason; the latest steps (decode, prefill and pad tokens, batch size,
preemptions); throughput and TTFT / inter-token / end-to-end percentiles over a sliding window;
KV usage and the queue over time; every unfinished request (state, progress, blocks, priority);
the recently finished ones; the KV block map per engine; one lane per replica.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot
from carpool.engine.view import EngineView, IterationEvent
from carpool.server.dashboard_kv import CACHED, FREE, KVMap
from carpool.server.dashboard_stats import WINDOW_S, Latencies, Routing, encode, percentiles

__all__ = ["CACHED", "FREE", "FrameBuilder", "percentiles"]

MAX_STEPS = 240  # steps drawn on the timeline
HISTORY_TENTHS = 600  # KV usage / queue history shown (tenths of a second)
VERDICT_S = 3.0  # the verdict looks at this much recent time
MAX_PENDING = 4096  # iterations queued by the tap before it folds them in itself

_STATES = {s: encode(s) for s in ("waiting", "running", "preempted")}


@dataclass
class _Totals:
    """Counters since the builder started; rates are their differences between frame ticks,
    so a frame never walks more than the steps it draws."""

    steps: int = 0
    decode: int = 0
    prefill: int = 0
    pad: int = 0
    sampled: int = 0

    def copy(self) -> _Totals:
        return _Totals(self.steps, self.decode, self.prefill, self.pad, self.sampled)


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
        self._origin = clock()  # frame clocks count tenths of a second from here
        self._pending: deque[IterationEvent] = deque()  # queued by the tap, folded in by ticks
        self._lock = threading.Lock()  # folding in (a tick, or the tap when the queue is full)
        # folded in from the iterations (under the lock)
        self._totals = _Totals()
        self._rows: deque[str] = deque(maxlen=MAX_STEPS)  # step rows, encoded
        self._new_rows: list[str] = []  # since the previous tick
        self._latencies = Latencies(self._origin)
        self._routing = Routing(self._origin)
        self._views: dict[int, EngineView] = {}
        self._snapshots: dict[int, EngineSnapshot] = {}
        # the ticks' own (event loop)
        self._marks: deque[tuple[float, _Totals]] = deque()  # (frame time, totals then)
        # [clock (tenths of a second), KV use in permille, running, waiting]
        self._history: deque[list[int]] = deque()
        self._last_sample = float("-inf")
        self._new_points: list[list[int]] = []
        self._finished_sent = 0  # finished requests as of the previous tick
        # per engine: its requests' stable keys (id -> (key, the fields that never change)),
        # its requests encoded for its latest view (with their keys in order), its KV map
        self._keys: dict[int, dict[str, tuple[int, str]]] = {}
        self._next_key = 0
        self._requests: dict[int, tuple[EngineView | None, str, list[int]]] = {}
        self._kv: dict[int, KVMap] = {}
        self._config_json: tuple[int, str] = (-1, "")
        # the latest tick, for its keyframe: the fields shared with its delta, the step rows,
        # the finished list, (replica, blocks used) per KV map
        self._common = ""
        self._key_rows: tuple[str, ...] = ()
        self._key_finished = "[]"
        self._kv_used: list[tuple[int, int]] = []
        self._keyframe: str | None = None

    # ---- the tap (engine thread, or the event loop for replicas) ----------------------------

    def on_iteration(self, event: IterationEvent) -> None:
        """Queue one engine iteration (O(1); the next frame tick folds it in)."""
        self._pending.append(event)
        if len(self._pending) > MAX_PENDING:  # no tick for a while: stay bounded
            with self._lock:
                self._fold(self.clock())

    def _fold(self, now: float) -> None:
        """Fold the queued iterations in (under the lock)."""
        pending = self._pending
        if pending:
            t, rows, new_rows = self._totals, self._rows, self._new_rows
            while pending:
                event = pending.popleft()
                self._snapshots[event.replica] = event.snapshot
                rec = event.record
                if rec is not None:
                    prefill = rec.num_prefill_tokens
                    decode = rec.num_tokens - prefill
                    t.steps += 1
                    t.decode += decode
                    t.prefill += prefill
                    t.pad += rec.num_padded_tokens
                    t.sampled += rec.num_sampled
                    # [seq, replica, decode, prefill, pad, batch, preempted]
                    row = (
                        f"[{t.steps},{event.replica},{decode},{prefill},{rec.num_padded_tokens},"
                        f"{rec.num_seqs},{rec.num_preempted}]"
                    )
                    rows.append(row)
                    new_rows.append(row)
                if event.view is not None:
                    self._views[event.replica] = event.view
                for out, reason in event.finished:
                    self._latencies.add(out, reason, event.replica, now)
                    self._routing.note(out.request_id, event.replica, now)
            if len(new_rows) > MAX_STEPS:
                del new_rows[:-MAX_STEPS]

    # ---- frames (event loop) ----------------------------------------------------------------

    def tick(self) -> str:
        """Fold the queued iterations in and return this tick's delta frame (JSON text);
        ``keyframe_json`` then gives the same tick's keyframe."""
        now = self.clock()
        with self._lock:  # only ever waits for the tap when its queue overflowed
            self._fold(now)
            return self._tick(now)

    def _tick(self, now: float) -> str:
        clock = round(10 * (now - self._origin))
        total = self.snapshot()
        self._record_history(now, clock, total)
        totals = self._totals.copy()
        new_rows, self._new_rows = self._new_rows, []
        self._key_rows = tuple(self._rows)  # the keyframe's, should the tap fold more in
        num_finished = self._latencies.num_finished
        self._key_finished = self._latencies.list_json()
        latencies = self._latencies.window_json(now)
        self._marks.append((now, totals))
        while now - self._marks[0][0] > max(WINDOW_S, VERDICT_S):
            self._marks.popleft()
        lanes = self._routing.lanes(self.describe())
        replicas = sorted({x["replica"] for x in lanes} | set(self._views))
        requests = [self._requests_of(r, now) for r in replicas]
        for r in set(self._kv) - set(replicas):
            del self._kv[r]
        self._kv_used = []
        for r in replicas:
            kv = self._kv.get(r)
            if kv is None:
                kv = self._kv[r] = KVMap(self.limits.num_blocks, self.config.block_size)
            kv.update(self._views.get(r), self._requests[r][2])
            snap = self._snapshots.get(r)
            self._kv_used.append((r, snap.num_blocks - snap.num_free_blocks if snap else 0))
        window, before = self._since(now, WINDOW_S)
        rate = lambda a, b: round((a - b) / window, 2) if window else 0.0  # noqa: E731
        small = encode({
            "time": now,
            "clock": clock,
            "verdict": self._verdict(totals, total, now, clock),
            "totals": {
                "running": total.num_running,
                "waiting": total.num_waiting,
                "kv_used_blocks": total.num_blocks - total.num_free_blocks,
                "num_blocks": total.num_blocks,
                "kv_usage": round(total.kv_cache_usage, 4),
                "preemptions": total.num_preemptions,
                "steps": totals.steps,
                "mean_batch_size": round(total.mean_batch_size, 3),
            },
            "lanes": lanes,
        })  # fmt: skip
        rates = (
            f'{{"window_s":{WINDOW_S},"generation_tps":{rate(totals.sampled, before.sampled)},'
            f'"prefill_tps":{rate(totals.prefill, before.prefill)},'
            f'"steps_per_s":{rate(totals.steps, before.steps)},{latencies}}}'
        )
        requests_json = ",".join(x for x in requests if x)
        self._common = (
            f'{small[:-1]},"rates":{rates},"config":{self._config(len(lanes))},'
            f'"requests":[{requests_json}]'
        )
        self._keyframe = None
        points = ",".join(encode(p) for p in self._new_points)
        self._new_points = []
        finished = ""
        if self._finished_sent != num_finished:
            self._finished_sent = num_finished
            finished = f',"finished":{self._key_finished}'
        kv = ",".join(self._kv[r].entry(r, used, whole=False) for r, used in self._kv_used)
        return (
            f'{self._common},"key":false,"steps":[{",".join(new_rows)}],"history":[{points}]'
            f'{finished},"kv":[{kv}]}}'
        )

    def keyframe_json(self) -> str:
        """The latest tick's keyframe (JSON text): every field whole (built once per tick)."""
        if self._keyframe is None:
            assert self._common, "tick() first"
            kv = ",".join(self._kv[r].entry(r, used, whole=True) for r, used in self._kv_used)
            self._keyframe = (
                f'{self._common},"key":true,"steps":[{",".join(self._key_rows)}],'
                f'"history":{encode(list(self._history))},'
                f'"finished":{self._key_finished},"kv":[{kv}]}}'
            )
        return self._keyframe

    def frame(self) -> dict[str, Any]:
        """Tick, and return the keyframe as a dict (for tests and tools)."""
        self.tick()
        frame: dict[str, Any] = json.loads(self.keyframe_json())
        return frame

    # ---- the pieces -------------------------------------------------------------------------

    def _requests_of(self, replica: int, now: float) -> str:
        """One engine's unfinished requests, encoded (again only for a new view); the keys
        its KV map uses stay with each request for its life."""
        view = self._views.get(replica)
        cached = self._requests.get(replica)
        if cached is not None and cached[0] is view:
            return cached[1]
        old = self._keys.get(replica, {})
        keys: dict[str, tuple[int, str]] = {}  # id -> (key, the fields that never change)
        owners: list[int] = []
        parts: list[str] = []
        states, origin = _STATES, self._origin
        for r in view.requests if view is not None else ():
            rid = r.request_id
            known = old.get(rid)
            if known is None:
                key = self._next_key
                self._next_key += 1
                self._routing.note(rid.split("#")[0], replica, now)
                known = (
                    key,
                    f'{{"id":{encode(rid)},"key":{key},"replica":{replica},'
                    f'"prompt":{r.prompt_tokens},"max_tokens":{r.max_tokens},'
                    f'"arrival":{round(10 * (r.arrival_time - origin))},',
                )
            keys[rid] = known
            owners.append(known[0])
            state = states.get(r.state) or encode(r.state)
            priority = "null" if r.priority is None else int(r.priority)
            parts.append(
                f'{known[1]}"state":{state},"computed":{r.computed_tokens},'
                f'"generated":{r.generated_tokens},"blocks":{len(r.block_ids)},'
                f'"priority":{priority}}}'
            )
        self._keys[replica] = keys
        text = ",".join(parts)
        self._requests[replica] = (view, text, owners)
        return text

    def _since(self, now: float, seconds: float) -> tuple[float, _Totals]:
        """(elapsed, totals) at the oldest frame tick within the last ``seconds``."""
        marks = self._marks
        i = bisect.bisect_left(marks, -seconds, key=lambda m: m[0] - now)
        if i == len(marks):
            return 0.0, marks[-1][1]
        return now - marks[i][0], marks[i][1]

    def _record_history(self, now: float, clock: int, total: EngineSnapshot) -> None:
        h = self._history
        if now - self._last_sample >= 0.25:  # 4 points a second, whatever the frame rate
            self._last_sample = now
            point = [clock, round(1000 * total.kv_cache_usage), total.num_running,
                     total.num_waiting]  # fmt: skip
            h.append(point)
            self._new_points.append(point)
        while h and clock - h[0][0] > HISTORY_TENTHS:
            h.popleft()

    def _config(self, num_replicas: int) -> str:
        if self._config_json[0] == num_replicas:
            return self._config_json[1]
        c = self.config
        text = encode({
            "batching": c.batching, "layout": c.layout, "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens, "batch_size": c.batch_size,
            "max_wait_ms": c.max_wait_ms, "block_size": c.block_size,
            "max_model_len": self.limits.max_model_len, "num_blocks": self.limits.num_blocks,
            "dtype": c.dtype, "replicas": num_replicas,
        })  # fmt: skip
        self._config_json = (num_replicas, text)
        return text

    def _verdict(
        self, totals: _Totals, total: EngineSnapshot, now: float, clock: int
    ) -> dict[str, str]:
        """Where the time goes lately: queueing beats prefill-bound beats decode-bound."""
        waits = []
        for t, _, _, w in reversed(self._history):
            if clock - t > 10 * VERDICT_S:
                break
            waits.append(w)
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

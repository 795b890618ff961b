"""``FrameBuilder`` on hand-made engine iterations: the verdict, the KV map (cached blocks and
priorities when an engine reports them), the percentiles and the routing lanes. The chain of
delta frames is checked in ``test_dashboard_deltas``."""

from __future__ import annotations

import json
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.view import EngineView, IterationEvent, RequestView
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.request import RequestTimings
from carpool.server.dashboard_frames import CACHED, FREE, FrameBuilder, percentiles

LIMITS = ModelLimits("m", max_model_len=256, vocab_size=100, num_blocks=16, block_size=4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def builder(
    snapshot: EngineSnapshot | None = None, lanes: int = 1
) -> tuple[FrameBuilder, Clock, dict[str, Any]]:
    clock = Clock()
    state: dict[str, Any] = {
        "snapshot": snapshot or EngineSnapshot(num_blocks=16, num_free_blocks=16)
    }
    b = FrameBuilder(
        EngineConfig(max_num_seqs=4),
        LIMITS,
        lambda: state["snapshot"],
        lambda: [{"replica": i, "state": "ready", "load": {}} for i in range(lanes)],
        clock=clock,
    )
    return b, clock, state


def step(clock: Clock, decode: int, prefill: int, replica: int = 0, preempted: int = 0) -> Any:
    rec = StepRecord(
        start=clock.now - 0.01, duration=0.01, num_seqs=decode + (prefill > 0),
        num_tokens=decode + prefill, num_padded_tokens=0, num_sampled=decode,
        kv_blocks_in_use=0, num_prefill_tokens=prefill, num_preempted=preempted,
    )  # fmt: skip
    return IterationEvent(replica, rec, EngineSnapshot())


def test_verdict_tells_decode_from_prefill_from_queueing_from_idle() -> None:
    b, clock, state = builder()
    assert b.frame()["verdict"]["state"] == "idle"
    for _ in range(10):
        clock.now += 0.05
        b.on_iteration(step(clock, decode=4, prefill=0))
    assert b.frame()["verdict"]["state"] == "decode-bound"
    for _ in range(10):
        clock.now += 0.05
        b.on_iteration(step(clock, decode=1, prefill=60))
    frame = b.frame()
    assert frame["verdict"]["state"] == "prefill-bound", frame["verdict"]
    assert "%" in frame["verdict"]["why"]
    state["snapshot"] = EngineSnapshot(num_running=4, num_waiting=5, num_blocks=16)
    for _ in range(8):  # the history samples the queue 4 times a second
        clock.now += 0.3
        b.on_iteration(step(clock, decode=4, prefill=0))
        b.frame()
    assert b.frame()["verdict"]["state"] == "queueing"
    state["snapshot"] = EngineSnapshot(num_blocks=16, num_free_blocks=16)
    clock.now += 10
    assert b.frame()["verdict"]["state"] == "idle"


def test_steps_carry_decode_prefill_and_preemptions_in_order() -> None:
    b, clock, _ = builder()
    for i in range(300):
        clock.now += 0.01
        b.on_iteration(step(clock, decode=i % 3, prefill=5, preempted=int(i == 299)))
    delta = json.loads(b.tick())  # the first tick's delta: the rows it has not sent (240)
    assert delta["steps"] == json.loads(b.keyframe_json())["steps"]
    for _ in range(5):
        clock.now += 0.01
        b.on_iteration(step(clock, decode=1, prefill=0))
    assert [s[0] for s in json.loads(b.tick())["steps"]] == [301, 302, 303, 304, 305]
    steps = b.frame()["steps"]
    assert len(steps) == 240 and steps[-1][0] == 305  # the latest 240, numbered from 1
    assert steps[-6][2:4] == [299 % 3, 5] and steps[-6][6] == 1
    assert sum(s[6] for s in steps) == 1


def test_kv_map_shows_owners_cached_blocks_and_priorities_when_present() -> None:
    b, clock, state = builder()
    view = EngineView(
        time=clock.now,
        requests=(
            RequestView("a", "running", 99.0, 8, 8, 3, 10, block_ids=(0, 1, 2), priority=1),
            RequestView("b", "waiting", 99.5, 6, 0, 0, 10, priority=0),
        ),
        num_blocks=16,
        block_size=4,
        num_free_blocks=11,
        cached_block_ids=(5, 6),
    )
    state["snapshot"] = EngineSnapshot(num_blocks=16, num_free_blocks=11)
    b.on_iteration(IterationEvent(0, None, state["snapshot"], (), view))
    f = b.frame()
    cells = [v for v, n in f["kv"][0]["cells"] for _ in range(n)]  # runs of [value, count]
    key_a = f["requests"][0]["key"]  # cells hold the owner's key
    assert cells[:3] == [key_a] * 3 and cells[5:7] == [CACHED, CACHED]
    assert cells.count(FREE) == 11 and f["kv"][0]["cached"] == 2 and f["kv"][0]["used"] == 5
    assert [(r["id"], r["state"], r["priority"]) for r in f["requests"]] == [
        ("a", "running", 1),
        ("b", "waiting", 0),
    ]
    # Without a prefix cache or priorities the fields are None (the page hides them).
    b.on_iteration(
        IterationEvent(0, None, state["snapshot"], (), EngineView(time=1, num_blocks=16))
    )
    assert b.frame()["kv"][0]["cached"] is None


def test_finished_requests_give_latency_percentiles_and_routing_lanes() -> None:
    b, clock, _ = builder(lanes=2)
    for i in range(10):
        timing = RequestTimings(0.01, 0.1 * (i + 1), [0.02, 0.03], 0.5 + i)
        out = RequestOutput(f"r{i}", None, [1, 2, 3], [CompletionOutput(0, "x", [5, 6, 7], "stop")],
                            True, timings=[timing])  # fmt: skip
        b.on_iteration(IterationEvent(i % 2, None, EngineSnapshot(), [(out, "stop")]))
    f = b.frame()
    assert f["rates"]["ttft_ms"] == {"p50": 600.0, "p90": 1000.0, "p99": 1000.0}
    assert f["rates"]["itl_ms"]["p50"] in (20.0, 30.0)
    assert [x["id"] for x in f["finished"]][:2] == ["r9", "r8"]
    assert [[rid for _, rid in lane["recent"]] for lane in f["lanes"]] == [
        ["r0", "r2", "r4", "r6", "r8"],
        ["r1", "r3", "r5", "r7", "r9"],
    ]
    assert f["config"]["replicas"] == 2 and len(f["kv"]) == 2


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles(list(range(1, 101))) == {"p50": 51, "p90": 91, "p99": 100}

"""The stream's keyframes and deltas: a keyframe followed by the deltas after it always adds up to
the latest keyframe (steps, history, finished requests, every KV map), whatever the engines did
between ticks; and a viewer gets a keyframe first and again after any frame it missed."""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from typing import Any

from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.view import EngineView, IterationEvent, RequestView
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.request import RequestTimings
from carpool.server.dashboard import Viewer
from carpool.server.dashboard_frames import FrameBuilder
from carpool.server.dashboard_kv import FREE, expand_runs
from carpool.server.dashboard_wire import merge_frame


class Engine:
    """A toy engine: requests take FIFO blocks as they grow, finish, or lose them all."""

    def __init__(self, rng: random.Random, replica: int, num_blocks: int, cache: bool) -> None:
        self.rng, self.replica, self.num_blocks, self.cache = rng, replica, num_blocks, cache
        self.free = deque(range(num_blocks))
        self.running: dict[str, list[int]] = {}
        self.cached: list[int] = []
        self.steps = 0

    def step(self, now: float, with_view: bool) -> IterationEvent:
        rng, finished, preempted = self.rng, [], 0
        if len(self.running) < 6 and len(self.free) >= 12 and rng.random() < 0.5:
            rid = f"r{self.replica}-{self.steps}"
            self.running[rid] = [self.free.popleft() for _ in range(rng.randint(1, 4))]
        for rid, blocks in list(self.running.items()):
            if rng.random() < 0.3 and self.free:
                blocks.append(self.free.popleft())
            if rng.random() < 0.05:  # preempted and readmitted at once: a new table
                self.free.extend(blocks)
                blocks[:] = [self.free.popleft() for _ in range(len(blocks))]
                preempted += 1
            elif rng.random() < 0.08 or len(self.free) < 8:
                del self.running[rid]
                if self.cache:  # a prefix cache keeps some of them, and evicts the oldest
                    self.cached += blocks[:1]
                    blocks = blocks[1:] + self.cached[:-4]
                    del self.cached[:-4]
                self.free.extend(blocks)
                timing = RequestTimings(0.01, 0.05, [0.01, 0.02], 0.3)
                out = RequestOutput(rid, None, [1, 2], [CompletionOutput(0, "x", [3], "stop")],
                                    True, timings=[timing])  # fmt: skip
                finished.append((out, "stop"))
        self.steps += 1
        rec = StepRecord(
            now - 0.01,
            0.01,
            len(self.running),
            len(self.running) + 3,
            0,
            len(self.running),
            0,
            num_prefill_tokens=3,
            num_preempted=preempted,
        )
        used = self.num_blocks - len(self.free)
        snap = EngineSnapshot(
            num_running=len(self.running),
            num_free_blocks=len(self.free),
            num_blocks=self.num_blocks,
            kv_cache_usage=used / self.num_blocks,
        )
        view = None
        if with_view:
            reqs = tuple(RequestView(rid, "running", now - 1, 8, 8, 1, 16, tuple(b))
                         for rid, b in self.running.items())  # fmt: skip
            view = EngineView(now, reqs, self.num_blocks, 4, len(self.free),
                              tuple(self.cached) if self.cache else None)  # fmt: skip
        return IterationEvent(self.replica, rec, snap, finished, view)


def run_chain(num_blocks: int, seed: int, ticks: int = 400) -> int:
    """Tick a builder over two toy engines; returns how many deltas sent a whole KV map."""
    rng = random.Random(seed)
    clock = {"now": 100.0}
    lanes = {"n": 1}
    engines = [Engine(rng, 0, num_blocks, cache=False), Engine(rng, 1, num_blocks, cache=True)]
    limits = ModelLimits("m", max_model_len=256, vocab_size=100, num_blocks=num_blocks,
                         block_size=4)  # fmt: skip
    b = FrameBuilder(EngineConfig(max_num_seqs=6), limits, lambda: EngineSnapshot(),
                     lambda: [{"replica": i, "state": "ready"} for i in range(lanes["n"])],
                     clock=lambda: clock["now"])  # fmt: skip
    merged: dict[str, Any] | None = None
    whole = 0
    for t in range(ticks):
        if t == 150:
            lanes["n"] = 2  # a second replica comes up: its map arrives whole
        for _ in range(rng.choice([0, 1, 3, 12])):  # some ticks see no step at all
            clock["now"] += 0.01
            for e in engines[: lanes["n"]]:
                b.on_iteration(e.step(clock["now"], with_view=rng.random() < 0.6))
        clock["now"] += rng.choice([0.1, 0.1, 0.3, 2.0])  # the history spans over a minute
        delta = json.loads(b.tick())
        key = json.loads(b.keyframe_json())
        assert not delta["key"] and key["key"]
        whole += sum("cells" in k for k in delta["kv"])
        merged = merge_frame(merged, key if merged is None else delta)
        for field in ("steps", "history", "finished", "kv", "requests"):
            assert merged[field] == key[field], (t, field)
        assert merged == key, t
        for kv in key["kv"]:  # every owned cell names a request of the frame
            keys = {r["key"] for r in key["requests"] if r["replica"] == kv["replica"]}
            assert {c for c in expand_runs(kv["cells"]) if c >= 0} <= keys
    assert len(merged["steps"]) == 240 and {s[1] for s in merged["steps"]} == {0, 1}
    assert merged["history"][-1][0] - merged["history"][0][0] <= 600 < merged["clock"]
    return whole


def test_deltas_add_up_to_the_keyframe() -> None:
    assert run_chain(num_blocks=64, seed=1) >= 1  # the second replica's map came whole


def test_deltas_add_up_when_a_cell_stands_for_several_blocks() -> None:
    run_chain(num_blocks=5000, seed=2, ticks=200)  # 3 blocks per cell: the rebuild path


def test_an_idle_tick_sends_no_kv_change_and_no_finished_list() -> None:
    b = FrameBuilder(EngineConfig(), ModelLimits("m", 256, 100, 32, 4), lambda: EngineSnapshot(),
                     lambda: [{"replica": 0, "state": "ready"}])  # fmt: skip
    first = json.loads(b.tick())
    assert first["kv"][0]["cells"] == [[FREE, 32]]  # a new map goes whole, even in a delta
    delta = json.loads(b.tick())
    assert delta["kv"][0]["changes"] == [] and "finished" not in delta and delta["steps"] == []


def test_a_viewer_gets_a_keyframe_first_and_after_a_dropped_frame() -> None:
    async def run() -> None:
        v = Viewer()
        built: list[str] = []

        def key(n: int) -> Any:
            return lambda: built.append(f"key{n}") or f"key{n}"

        v.offer("delta1", key(1))
        assert await v.take() == "key1"  # it has nothing yet
        v.offer("delta2", key(2))
        assert await v.take() == "delta2"
        v.offer("delta3", key(3))  # not read before the next tick: dropped
        v.offer("delta4", key(4))
        assert (v.dropped, await v.take()) == (1, "key4")
        v.offer("delta5", key(5))
        assert await v.take() == "delta5"
        assert built == ["key1", "key4"] and v.keyframes == 2 and v.sent == 4

    asyncio.run(run())

"""What one dashboard frame and one engine-thread tap cost, in isolation (no server, no model).

A deterministic simulation of a busy engine feeds a ``FrameBuilder`` exactly what an engine
client would: ``--running`` requests decode in lockstep (one token per step, a new KV block
every ``block_size`` tokens from a FIFO free list, so their blocks interleave as in the real
block manager), ``--waiting`` more queue; a finished request frees its blocks and a new one
arrives; every step is an ``IterationEvent`` and every ``--steps-per-frame``-th one carries an
``EngineView`` (the core sends one per frame interval). Between frames the builder sees those
steps; then the broadcaster's per-tick work is timed: on ``main``'s code (``--baseline``,
loaded from git into this process) ``frame_json()``; on this tree's code the tick's delta frame
and, separately, a keyframe (what a viewer gets on connect and after a dropped frame). Both
builders see the same event list, alternately (``--rounds``), and medians are reported.

Usage:
    python benchmarks/dashboard_frames.py --running 16 --blocks 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import checkout  # noqa: F401  (this checkout's src first on sys.path)

from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.engine.view import EngineView, IterationEvent, RequestView
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.request import RequestTimings

STEP_S = 0.011  # a decode step of the embedded model with 16 sequences on 1 thread


@dataclass
class _Req:
    rid: str
    arrival: float
    prompt: int
    max_tokens: int
    generated: int = 0
    blocks: list[int] = field(default_factory=list)


class Clock:
    """The simulated engine clock (shared by the simulation and the builders)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(
    num_steps: int, running: int, waiting: int, num_blocks: int, block_size: int,
    steps_per_frame: int,
) -> list[tuple[float, IterationEvent]]:  # fmt: skip
    """``(time, event)`` for ``num_steps`` engine iterations of a busy engine."""
    free = deque(range(num_blocks))
    now = 1000.0
    counter = 0

    def new_request() -> _Req:
        nonlocal counter
        counter += 1
        # prompts of 20-200 tokens, 256-768 tokens to generate: requests end at different times
        return _Req(
            f"cmpl-{counter:06d}", now, 20 + (counter * 37) % 180, 256 + (counter * 97) % 512
        )

    run = [new_request() for _ in range(running)]
    wait = deque(new_request() for _ in range(waiting))
    for r in run:  # the prompt's blocks
        r.blocks = [free.popleft() for _ in range(-(-r.prompt // block_size))]
    events: list[tuple[float, IterationEvent]] = []
    preemptions = 0
    for step in range(num_steps):
        now += STEP_S
        finished = []
        for r in run:
            r.generated += 1
            if (r.prompt + r.generated) % block_size == 1:
                r.blocks.append(free.popleft())
        for r in [r for r in run if r.generated >= r.max_tokens]:
            run.remove(r)
            free.extend(r.blocks)
            gaps = [STEP_S] * (r.generated - 1)
            timings = RequestTimings(0.01, 0.05, gaps, now - r.arrival)
            out = RequestOutput(r.rid, None, list(range(r.prompt)),
                                [CompletionOutput(0, "x", [], "length", num_tokens=r.generated)],
                                True, timings=[timings])  # fmt: skip
            finished.append((out, "length"))
            nxt = wait.popleft()
            nxt.blocks = [free.popleft() for _ in range(-(-nxt.prompt // block_size))]
            run.append(nxt)
            wait.append(new_request())
        used = num_blocks - len(free)
        rec = StepRecord(
            start=now - STEP_S,
            duration=STEP_S,
            num_seqs=len(run),
            num_tokens=len(run),
            num_padded_tokens=0,
            num_sampled=len(run),
            kv_blocks_in_use=used,
            num_prefill_tokens=0,
            num_preempted=0,
        )
        snap = EngineSnapshot(
            num_running=len(run),
            num_waiting=len(wait),
            num_free_blocks=len(free),
            num_blocks=num_blocks,
            kv_cache_usage=used / num_blocks,
            num_unfinished=len(run) + len(wait),
            steps=step + 1,
            mean_batch_size=float(len(run)),
            num_preemptions=preemptions,
        )
        view = None
        if step % steps_per_frame == 0:
            reqs = [
                RequestView(
                    r.rid,
                    "running",
                    r.arrival,
                    r.prompt,
                    r.prompt + r.generated,
                    r.generated,
                    r.max_tokens,
                    tuple(r.blocks),
                )
                for r in run
            ]
            reqs += [RequestView(r.rid, "waiting", r.arrival, r.prompt, 0, 0, r.max_tokens)
                     for r in wait]  # fmt: skip
            view = EngineView(now, tuple(sorted(reqs, key=lambda v: v.arrival_time)),
                              num_blocks, block_size, len(free), None)  # fmt: skip
        events.append((now, IterationEvent(0, rec, snap, finished, view)))
    return events


def load_baseline(ref: str) -> ModuleType | None:
    """``dashboard_frames`` as it is at git ``ref`` (None when git cannot show it)."""
    path = "src/carpool/server/dashboard_frames.py"
    try:
        source = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(f"dashboard_frames_{ref}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


@dataclass
class Result:
    tap_us: list[float] = field(default_factory=list)  # per step, engine thread
    frame_ms: list[float] = field(default_factory=list)  # per tick, event loop
    frame_bytes: list[int] = field(default_factory=list)
    key_ms: list[float] = field(default_factory=list)  # keyframes (new code only)
    key_bytes: list[int] = field(default_factory=list)


def run_once(
    module: ModuleType, events: list[tuple[float, IterationEvent]], num_blocks: int,
    block_size: int, steps_per_frame: int, warmup_frames: int, result: Result,
) -> None:  # fmt: skip
    """Feed ``events`` to a fresh builder of ``module``, one tick every ``steps_per_frame``."""
    clock = Clock()
    last: dict[str, EngineSnapshot] = {"s": EngineSnapshot(num_blocks=num_blocks)}
    lanes = lambda: [{"replica": 0, "state": "ready", "pid": 1, "device": "cpu",  # noqa: E731
                      "load": {"num_running": last["s"].num_running, "num_waiting": 0,
                               "kv_cache_usage": round(last["s"].kv_cache_usage, 4)}}]  # fmt: skip
    limits = ModelLimits("m", max_model_len=4096, vocab_size=32000, num_blocks=num_blocks,
                         block_size=block_size)  # fmt: skip
    builder = module.FrameBuilder(EngineConfig(max_num_seqs=64, block_size=block_size), limits,
                                  lambda: last["s"], lanes, clock=clock)  # fmt: skip
    tick: Callable[[], str] = builder.frame_json if not hasattr(builder, "tick") else builder.tick
    key: Callable[[], str] | None = getattr(builder, "keyframe_json", None)
    perf = time.perf_counter
    frames = 0
    for i in range(0, len(events) - steps_per_frame + 1, steps_per_frame):
        t_tap = 0.0
        for now, event in events[i : i + steps_per_frame]:
            clock.now = now
            t0 = perf()
            builder.on_iteration(event)
            t_tap += perf() - t0
            last["s"] = event.snapshot
        clock.now += 0.002
        t0 = perf()
        text = tick()
        t_frame = perf() - t0
        frames += 1
        if frames <= warmup_frames:
            continue
        result.tap_us.append(1e6 * t_tap / steps_per_frame)
        result.frame_ms.append(1e3 * t_frame)
        result.frame_bytes.append(len(text.encode()))
        json.loads(text)  # it is JSON
        if key is not None and frames % 5 == 0:
            t0 = perf()
            text = key()
            result.key_ms.append(1e3 * (perf() - t0))
            result.key_bytes.append(len(text.encode()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, default=16, help="requests decoding")
    ap.add_argument("--waiting", type=int, default=4, help="requests queued")
    ap.add_argument("--blocks", type=int, default=2048, help="KV blocks of the engine")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps-per-frame", type=int, default=9, help="steps between two ticks")
    ap.add_argument("--frames", type=int, default=200, help="frames timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations baseline / this tree")
    ap.add_argument("--baseline", default="main", help="git ref of the old code ('' = none)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    warmup = 300 // args.steps_per_frame + 1  # the builder's 240 steps and history fill first
    num_steps = (args.frames + warmup) * args.steps_per_frame
    events = simulate(num_steps, args.running, args.waiting, args.blocks, args.block_size,
                      args.steps_per_frame)  # fmt: skip
    import carpool.server.dashboard_frames as current

    impls: dict[str, ModuleType] = {}
    if args.baseline and (old := load_baseline(args.baseline)) is not None:
        impls[f"baseline ({args.baseline})"] = old
    impls["this tree"] = current
    results = {name: Result() for name in impls}
    gc.collect()
    for _ in range(args.rounds):
        for name, module in impls.items():
            gc.collect()  # each run starts without the other's garbage
            run_once(module, events, args.blocks, args.block_size, args.steps_per_frame,
                     warmup, results[name])  # fmt: skip

    med = statistics.median
    summary: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}}
    print(
        f"{args.running} running + {args.waiting} waiting requests, {args.blocks} KV blocks, "
        f"{args.steps_per_frame} steps per frame, {args.frames} frames x {args.rounds} rounds"
    )
    for name, r in results.items():
        row = {
            "tap_us_per_step": med(r.tap_us),
            "frame_ms": med(r.frame_ms),
            "frame_bytes": med(r.frame_bytes),
        }
        if r.key_ms:
            row |= {"keyframe_ms": med(r.key_ms), "keyframe_bytes": med(r.key_bytes)}
        summary[name] = row
        print(f"  {name:>16}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else
                                           f"{k} {v}" for k, v in row.items()))  # fmt: skip
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        for k in ("tap_us_per_step", "frame_ms"):
            summary[f"{k}_ratio"] = summary[a][k] / summary[b][k]
        print(f"  old/new: tap {summary['tap_us_per_step_ratio']:.1f}x, "
              f"frame {summary['frame_ms_ratio']:.1f}x")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

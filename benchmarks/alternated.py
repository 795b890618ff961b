"""Forward prebuilt step inputs alternated in one process: the in-process A/B of two batch builds.

Each repeat forwards every input once, in turn, so a busy machine's phases hit all of them
alike (``rectangle_groups.py``, ``prompt_kernel.py``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from carpool.worker.batch import ModelInput
from carpool.worker.model_runner import ModelRunner


def forward_alternated(
    runner: ModelRunner,
    inputs: Mapping[str, ModelInput],
    repeats: int,
    around: Mapping[str, Callable[[], contextlib.AbstractContextManager[object]]] | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median ms of each input's forward over ``repeats`` rounds (after two of warm-up), and
    each one's logits. ``around[name]``: a context each of that input's forwards runs in (the
    A/B of two code paths on one input)."""
    around = around or {}
    times: dict[str, list[float]] = {k: [] for k in inputs}
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(repeats + 2):
            for name, inp in inputs.items():
                with around.get(name, contextlib.nullcontext)():
                    t0 = time.perf_counter()
                    logits[name] = runner.model(
                        inp.input_ids, inp.positions, inp.meta, runner.kv_caches, inp.logits_indices
                    )
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}, logits

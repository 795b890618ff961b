"""The wire format of ``/v1/stats/stream`` and how a client merges it (the page does the same in
``static/dashboard.js``; tests and tools use ``merge_frame``).

Each server-sent event is one JSON frame. ``"key": true`` marks a **keyframe**, complete in
itself; a viewer gets one first, and again whenever a frame meant for it was dropped (it read
too slowly). Every other frame is a **delta** on the frame before it:

- ``steps``: only the step rows ``[seq, replica, decode, prefill, pad, batch, preempted]`` new
  since the previous frame (a keyframe: the latest ``MAX_STEPS``); keep the latest
  ``MAX_STEPS``;
- ``history``: only the new points ``[clock, KV use in permille, running, waiting]`` (a
  keyframe: the last minute); keep those at most ``HISTORY_TENTHS`` older than ``clock``;
- ``finished``: present only when it changed (then whole);
- ``kv``: one entry per engine, each with either ``cells`` (the whole map, ``[value, count]``
  runs) or ``changes`` (``[cell, value, ...]`` to apply to that engine's map);
- everything else (``time``, ``clock``, ``config``, ``verdict``, ``totals``, ``rates``,
  ``requests``, ``lanes``) is whole in every frame.

``clock`` counts tenths of a second since the stream's builder started; history points,
``finished[].end``, ``requests[].arrival`` and the lanes' ``recent`` chips are on that clock.
A KV cell holds ``FREE`` (-1), ``CACHED`` (-2) or the ``key`` of the request holding it.
"""

from __future__ import annotations

from typing import Any

from carpool.server.dashboard_frames import HISTORY_TENTHS, MAX_STEPS
from carpool.server.dashboard_kv import expand_runs, run_lengths

__all__ = ["merge_frame"]


def merge_frame(previous: dict[str, Any] | None, frame: dict[str, Any]) -> dict[str, Any]:
    """The complete frame that ``frame`` (a keyframe or a delta on ``previous``, the
    complete frame before it) stands for; it looks like a keyframe.

    Raises:
        ValueError: a delta without a previous frame (the server always starts with a
            keyframe).
    """
    if frame["key"]:
        return frame
    if previous is None:
        raise ValueError("a delta frame arrived before any keyframe")
    merged = dict(frame, key=True)
    merged["steps"] = (previous["steps"] + frame["steps"])[-MAX_STEPS:]
    oldest = frame["clock"] - HISTORY_TENTHS
    merged["history"] = [p for p in previous["history"] + frame["history"] if p[0] >= oldest]
    merged.setdefault("finished", previous["finished"])
    maps = {k["replica"]: k["cells"] for k in previous["kv"]}
    kv = []
    for entry in frame["kv"]:
        entry = dict(entry)
        changes = entry.pop("changes", None)
        if changes is not None:
            cells = expand_runs(maps[entry["replica"]])
            for i in range(0, len(changes), 2):
                cells[changes[i]] = changes[i + 1]
            entry["cells"] = run_lengths(cells)
        kv.append(entry)
    merged["kv"] = kv
    return merged

"""The dashboard's slower-moving figures, each kept with its encoded JSON so that a frame tick
re-encodes it only when it changed: finished requests and their latency percentiles
(``Latencies``), and where the router sent recent requests (``Routing``).

Times are kept on the engines' clock; the frame carries them as its ``clock``, tenths of a
second since the builder's ``origin`` (integers are cheaper to encode than floats, and a point
in time needs no re-encoding as it ages).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from carpool.outputs import RequestOutput

MAX_FINISHED = 12  # finished requests listed
MAX_GAPS = 2048  # inter-token gaps kept for the percentiles
WINDOW_S = 10.0  # throughput and latency percentiles over this sliding window
MAX_RECENT = 12  # routed requests shown per lane

encode = json.JSONEncoder(separators=(",", ":")).encode


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 (nearest rank) of ``values``, None for each when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


@dataclass(frozen=True)
class Finished:
    """One finished request, as the frame lists it."""

    end: float
    request_id: str
    replica: int
    prompt_tokens: int
    generated: int
    ttft: float | None
    e2e: float | None
    reason: str
    json: str  # as the frame lists it (the end on the frame clock)


class Latencies:
    """Finished requests and their TTFT / inter-token / end-to-end percentiles.

    Args:
        origin: the engine-clock time of frame clock 0.
    """

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.num_finished = 0
        self._finished: deque[Finished] = deque(maxlen=512)
        # (end, inter-token gaps) per finished request, the latest MAX_GAPS gaps in all
        self._gaps: deque[tuple[float, list[float]]] = deque()
        self._num_gaps = 0
        self._window: tuple[float, int, str] = (float("-inf"), 0, "")  # (when, finished, json)
        self._listed: tuple[int, str] = (-1, "")  # (num_finished, the list encoded)

    def add(self, out: RequestOutput, reason: str, replica: int, now: float) -> None:
        """Note a request that finished at ``now``."""
        self.num_finished += 1
        t = out.timings[0] if out.timings else None
        ttft, e2e = (t.ttft, t.e2e) if t is not None else (None, None)
        listed = encode({
            "id": out.request_id, "replica": replica, "prompt": len(out.prompt_token_ids),
            "generated": out.num_generated_tokens, "reason": reason, "ttft_ms": _ms1(ttft),
            "e2e_ms": _ms1(e2e), "end": round(10 * (now - self.origin)),
        })  # fmt: skip
        self._finished.append(
            Finished(now, out.request_id, replica, len(out.prompt_token_ids),
                     out.num_generated_tokens, ttft, e2e, reason, listed)
        )  # fmt: skip
        for timing in out.timings:
            gaps = timing.inter_token_gaps[-256:]
            self._gaps.append((now, gaps))
            self._num_gaps += len(gaps)
        while self._gaps and self._num_gaps - len(self._gaps[0][1]) >= MAX_GAPS:
            self._num_gaps -= len(self._gaps.popleft()[1])

    def window_json(self, now: float) -> str:
        """The percentiles as JSON object members (no braces); sorted again at most once a
        second, or at once when the first request finishes."""
        when, num_finished, text = self._window
        fresh = now - when < 1.0 and (num_finished == self.num_finished or num_finished > 0)
        if fresh and text:
            return text
        horizon = 3 * WINDOW_S  # finished requests are rarer than steps: a longer window
        finished = [f for f in self._finished if now - f.end <= horizon]
        gaps = [g for t, gs in self._gaps if now - t <= horizon for g in gs]
        text = encode({
            "ttft_ms": _ms(percentiles([f.ttft for f in finished if f.ttft is not None])),
            "itl_ms": _ms(percentiles(gaps)),
            "e2e_ms": _ms(percentiles([f.e2e for f in finished if f.e2e is not None])),
            "finished_in_window": len(finished),
        })[1:-1]  # fmt: skip
        self._window = (now, self.num_finished, text)
        return text

    def list_json(self) -> str:
        """The latest finished requests, newest first (encoded again only after a finish)."""
        n, text = self._listed
        if n == self.num_finished:
            return text
        finished = list(self._finished)[-MAX_FINISHED:]
        text = "[" + ",".join(f.json for f in reversed(finished)) + "]"
        self._listed = (self.num_finished, text)
        return text


class Routing:
    """Which engine each request went to, first seen (a view or a finish), for the lanes.

    Args:
        origin: the engine-clock time of frame clock 0.
    """

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self._routed: deque[tuple[float, int, str]] = deque(maxlen=64)  # t, replica, id
        self._seen: dict[str, int] = {}  # request id -> replica (bounded below)
        self._num_routed = 0
        self._recent: tuple[Any, dict[int, list[tuple[int, str]]]] = (None, {})

    def note(self, request_id: str, replica: int, now: float) -> None:
        """``request_id`` runs on ``replica`` (only its first sighting counts)."""
        if request_id in self._seen:
            return
        self._seen[request_id] = replica
        self._routed.append((now, replica, request_id))
        self._num_routed += 1
        if len(self._seen) > 4096:  # forget the oldest half (dicts keep insertion order)
            for rid in list(self._seen)[:2048]:
                del self._seen[rid]

    def lanes(self, lanes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``lanes`` (``describe()``), each with ``recent``: the requests the router sent it
        lately, oldest first, as ``[clock, id]``."""
        replicas = tuple(x["replica"] for x in lanes)
        if self._recent[0] != (self._num_routed, replicas):
            recent: dict[int, list[tuple[int, str]]] = {r: [] for r in replicas}
            wanted = MAX_RECENT * len(recent)
            for t, r, rid in reversed(self._routed):
                chips = recent.get(r)
                if wanted and chips is not None and len(chips) < MAX_RECENT:
                    chips.append((round(10 * (t - self.origin)), rid))
                    wanted -= 1
            self._recent = ((self._num_routed, replicas), {r: c[::-1] for r, c in recent.items()})
        return [{**x, "recent": self._recent[1][x["replica"]]} for x in lanes]


def _ms(p: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _ms1(v) for k, v in p.items()}


def _ms1(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)

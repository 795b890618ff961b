"""Imported by the benchmarks before ``carpool``: this checkout's ``src`` first on ``sys.path``.

The environment's ``carpool`` is an editable install of one worktree; a benchmark run from
another checkout (a second worktree holding the "before" of an A/B) would otherwise import and
measure the installed one's code, silently. The twenty-fifth and twenty-seventh passes of issue
11 each found "before / after" pairs that were the same code this way (``py_peer.py``, then
``profile_step.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)

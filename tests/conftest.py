"""Shared pytest setup: make ``tests/helpers`` importable and keep torch to the machine's cores."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

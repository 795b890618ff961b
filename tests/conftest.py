"""Shared pytest setup: make ``tests/helpers`` importable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers.devices import DEVICES  # noqa: E402 (after the path above)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device-parametrized test once per device: the CPU, and CUDA where present."""
    return request.param

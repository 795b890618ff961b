"""carpool: an LLM inference engine built around parallel inference."""

from __future__ import annotations

__version__ = "0.1.0"

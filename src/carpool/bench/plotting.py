"""matplotlib, imported once the same way for every report that draws a PNG."""

from __future__ import annotations

import logging
from types import ModuleType

logger = logging.getLogger("carpool.bench")


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the file-only ``Agg`` backend (no display needed), or None with
    a warning when matplotlib is not installed (it is the optional ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install 'carpool[plot]')")
        return None
    return plt

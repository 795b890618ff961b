"""The embedded 4M-parameter code model's directory, named so on every branch.

(``"default"`` may mean SmolLM2 where its package is installed; these tests want the model
that would never write JSON by itself.)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EMBEDDED = Path(str(resources.files("carpool") / "data" / "default_model"))

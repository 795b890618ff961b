"""Where a model lives and how its tokenizer is loaded (no torch: the HTTP front end of a
replica pool, the CLI and the benchmarks load a tokenizer without loading a model).

Resolution itself (local paths, Hub ids, the default and embedded models) is
``carpool.model.source``; it is re-exported here for the engine's callers.
"""

from __future__ import annotations

from pathlib import Path

from carpool.model.source import (  # noqa: F401 (re-exported)
    default_model_path,
    embedded_model_path,
    resolve_model_path,
)
from carpool.tokenizer import Tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model directory or GGUF file."""
    if path.is_file():
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_pretrained_dir(path)

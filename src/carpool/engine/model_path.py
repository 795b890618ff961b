"""Where a model lives and how its tokenizer is loaded (no torch: the HTTP front end of a
replica pool, the CLI and the benchmarks load a tokenizer without loading a model)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from carpool.tokenizer import Tokenizer


def default_model_path() -> Path:
    """The small model shipped inside the package (see docs/default-model.md)."""
    return Path(str(resources.files("carpool") / "data" / "default_model"))


def resolve_model_path(model: str | None) -> Path:
    """``None`` or ``"default"`` mean the embedded model; anything else is a path."""
    if model in (None, "", "default"):
        return default_model_path()
    return Path(model)


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model directory or GGUF file."""
    if path.is_file():
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_pretrained_dir(path)

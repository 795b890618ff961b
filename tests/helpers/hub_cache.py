"""A Hugging Face Hub cache laid out the way ``huggingface_hub`` lays it out (for offline tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Write ``models--ORG--NAME/{blobs,refs/main,snapshots/COMMIT}`` like huggingface_hub."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for i, (name, src) in enumerate(sorted(files.items())):
        blob = root / "blobs" / f"{i:040x}"
        shutil.copyfile(src, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot

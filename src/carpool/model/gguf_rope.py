"""Rope scaling of a GGUF file: ``{arch}.rope.scaling.*`` metadata or llama.cpp's
``rope_freqs.weight`` tensor (Llama 3.1 scaling), as a ``RopeScaling``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf.quants import dequantize

from carpool.config import RopeScaling
from carpool.errors import ModelLoadError
from carpool.model.gguf_file import GGUFFile

# llama.cpp's converter stores a Llama 3.1-style rope scaling as this tensor of per-frequency
# divisors instead of metadata; it is folded back into ``ModelConfig.rope_scaling``.
ROPE_FREQS = "rope_freqs.weight"
# Llama 3.x's pre-extension context; GGUF does not record it for llama3 scaling.
_LLAMA3_ORIGINAL_CONTEXT = 8192


def gguf_rope_scaling(
    reader: GGUFFile, arch: str, theta: float, head_dim: int, path: Path
) -> RopeScaling | None:
    """Rope scaling from ``{arch}.rope.scaling.*`` metadata or a ``rope_freqs.weight`` tensor.

    ``linear`` maps to itself; ``rope_freqs.weight`` (llama.cpp's form of Llama 3.1 scaling)
    is fitted back to ``RopeScaling(rope_type="llama3", ...)``; yarn/longrope are refused.
    """
    meta = reader.get
    kind = meta(f"{arch}.rope.scaling.type")
    factor = meta(f"{arch}.rope.scaling.factor")
    orig_ctx = meta(f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        data = dequantize(reader.tensor_data(freqs), freqs.tensor_type)
        divisors = np.array(data, dtype=np.float64)  # a copy: nothing keeps the map alive
        return _llama3_from_divisors(divisors.reshape(-1), theta, head_dim, orig_ctx, path)
    if kind in (None, "none") or (kind == "linear" and not factor):
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=f32(factor))
    raise ModelLoadError(f"{path}: unsupported rope scaling type {kind!r}")


def _llama3_from_divisors(
    divisors: np.ndarray, theta: float, head_dim: int, orig_ctx: int | None, path: Path
) -> RopeScaling | None:
    """Recover llama3 parameters that reproduce llama.cpp's per-frequency divisors.

    Frequencies with wavelength above ``orig/low`` are divided by ``factor``, those below
    ``orig/high`` are kept, and in between the divisor is ``1 / ((1 - s) / factor + s)`` with
    ``s = (orig / wavelen - low) / (high - low)``. ``factor`` is the largest divisor, but
    ``orig``, ``low`` and ``high`` are not all recoverable from a handful of frequencies. Any
    triple that reproduces every divisor yields the same rotary frequencies, so candidates are
    tried in order and the first that verifies wins:

    1. ``orig`` from metadata or Llama 3's 8192, ``low``/``high`` fitted from the in-between
       frequencies (a line in ``1 / wavelen``; needs two) or Llama 3.1's 1 and 4;
    2. ``low``/``high`` = 1 and 4 and ``orig`` solved from the in-between frequencies.
    """
    if divisors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"{path}: {ROPE_FREQS} has {divisors.size} values, expected {head_dim // 2}"
        )
    if np.allclose(divisors, 1.0):
        return None
    factor = f32(divisors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor) if factor > 1 else None

    candidates: list[tuple[int, float, float]] = []
    orig = int(orig_ctx or _LLAMA3_ORIGINAL_CONTEXT)
    if s is not None and s.size >= 2:
        slope, intercept = np.polyfit(orig / wavelen[between], s, 1)
        candidates.append((orig, round(-intercept / slope, 4), round((1 - intercept) / slope, 4)))
    candidates.append((orig, 1.0, 4.0))
    if s is not None and s.size >= 1:  # s = (orig / w - 1) / 3  =>  orig = w (3 s + 1)
        candidates.append((round(float(np.mean(wavelen[between] * (3 * s + 1)))), 1.0, 4.0))
    for orig, low, high in candidates:
        sm = (orig / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < orig / high,
            1.0,
            np.where(wavelen > orig / low, factor, 1 / ((1 - sm) / factor + sm)),
        )
        if np.allclose(divisors, expected, rtol=1e-4, atol=1e-6):
            return RopeScaling("llama3", factor, low, high, orig)
    raise ModelLoadError(
        f"{path}: {ROPE_FREQS} matches no llama3 rope scaling (divisors {divisors.tolist()})"
    )


def f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-06, not 9.99e-07)."""
    return float(str(np.float32(value)))

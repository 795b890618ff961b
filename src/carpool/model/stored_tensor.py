"""A large checkpoint tensor left in its safetensors file, read a slice of rows at a time.

A tensor ``safe_open`` gives is a view of the file's mapping: every page of it that is read stays
resident (file-backed) while the mapping lives, so packing a Llama 3.2 1B-shaped checkpoint's
500 MiB head under ``--quantization int4`` held all of its pages beside its codes (BENCHMARKS.md,
issue 11, thirty-seventh pass). ``loader.iter_safetensors`` hands a tensor larger than its
budget over as a ``StoredTensor`` instead, and its consumers (``loader.load_weights``'s copy into
the parameter, ``quant_loader.quantized_as_read``'s quantization) read it a slice of rows at a
time, each slice through an opening of the file of its own, dropped after it: at most a slice
of its pages is resident.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from carpool.errors import ModelLoadError

# Bytes of one slice of rows that copy_into reads.
SLICE_BYTES = 8 << 20
# safetensors' dtype names (``get_slice(...).get_dtype()``) of the tensors a checkpoint holds.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, not read yet; rows come as ``Tensor``s by slicing
    (``t[r0:r1]``), in ``dtype`` (``to`` returns one that converts them).

    Attributes:
        path: the file.
        name: the tensor's name in it.
        shape: its shape (at least one dimension).
        file_dtype: its dtype in the file.
        cast: the dtype its rows are converted to, None to keep ``file_dtype``.
    """

    path: Path
    name: str
    shape: tuple[int, ...]
    file_dtype: torch.dtype
    cast: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows it gives."""
        return self.cast or self.file_dtype

    @property
    def device(self) -> torch.device:
        """Its rows are read onto the CPU."""
        return torch.device("cpu")

    def to(self, dtype: torch.dtype) -> StoredTensor:
        """The same tensor, its rows converted to ``dtype`` as ``Tensor.to`` converts."""
        return dataclasses.replace(self, cast=dtype)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (a slice of the first dimension, step 1), read now."""
        assert isinstance(rows, slice) and rows.step in (None, 1), rows
        try:
            # Not `with`: closing the context costs ~5 ms, dropping the handle ~0.2 (measured);
            # either unmaps the file once no tensor of it is left.
            st = safe_open(str(self.path), framework="pt")
            part = st.get_slice(self.name)[rows]
            del st
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{self.path}: cannot read tensor {self.name!r} ({e})") from None
        # A view of that opening's mapping, valid after the handle is dropped (it keeps the
        # mapping until the caller, who copies or converts it at once, drops it).
        return part if self.cast is None else part.to(self.cast)

    def copy_into(self, dest: torch.Tensor) -> None:
        """``dest.copy_(tensor)``, ``SLICE_BYTES`` of the file at a time."""
        assert tuple(dest.shape) == self.shape, (tuple(dest.shape), self.shape)
        step = max(1, SLICE_BYTES // (math.prod(self.shape[1:]) * self.file_dtype.itemsize or 1))
        with torch.no_grad():
            for r in range(0, self.shape[0], step):
                dest[r : r + step].copy_(self[r : r + step])

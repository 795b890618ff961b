"""A lean reader of GGUF files: header, key/value metadata and tensor infos in one pass.

``gguf.GGUFReader`` keeps every metadata value as numpy views of the file, one (or two, for a
string) per array element: a 49,152-token vocabulary plus its merges become about a million
views, ~165 MB of Python objects and most of a model's load time. This reader walks the same
bytes with ``struct`` and turns each value straight into Python objects (``str``, ``int``,
``float``, ``bool``, lists of them; numeric arrays in one ``numpy.frombuffer(...).tolist()``).
Tensor data stay in the file: ``GGUFFile.tensor_data`` is a zero-copy numpy view of one
read-only ``numpy.memmap``, shaped exactly as ``GGUFReader`` shapes it (typed arrays for float
and integer types, ``[..., row bytes]`` uint8 for block-quantized ones), so ``gguf``'s own
``dequantize`` takes it unchanged. ``close()`` (or the end of a ``with`` block, or the object
being dropped) releases the map once no view is left.

Every length, count and offset is checked against the file size before it is used: a corrupt
or truncated file raises ``ModelLoadError`` naming the file, never a crash or a huge allocation.
Only GGUF versions 2 and 3, little-endian, are read (``GGUFReader``'s versions).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from carpool.errors import ModelLoadError

SUPPORTED_VERSIONS = (2, 3)
_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more

_V = GGUFValueType
# Scalar value types: (struct format, size, numpy dtype for arrays of them).
_SCALARS: dict[GGUFValueType, tuple[str, int, str]] = {
    _V.UINT8: ("<B", 1, "<u1"),
    _V.INT8: ("<b", 1, "<i1"),
    _V.UINT16: ("<H", 2, "<u2"),
    _V.INT16: ("<h", 2, "<i2"),
    _V.UINT32: ("<I", 4, "<u4"),
    _V.INT32: ("<i", 4, "<i4"),
    _V.FLOAT32: ("<f", 4, "<f4"),
    _V.BOOL: ("<?", 1, "?"),
    _V.UINT64: ("<Q", 8, "<u8"),
    _V.INT64: ("<q", 8, "<i8"),
    _V.FLOAT64: ("<d", 8, "<f8"),
}
_Q = GGMLQuantizationType
# Element dtypes ``GGUFReader`` gives these tensor types; every other type is uint8 blocks.
_TENSOR_DTYPES = {
    _Q.F16: np.float16, _Q.F32: np.float32, _Q.F64: np.float64, _Q.I8: np.int8,
    _Q.I16: np.int16, _Q.I32: np.int32, _Q.I64: np.int64,
}  # fmt: skip


class _Corrupt(Exception):
    """A structural problem found while parsing (turned into ``ModelLoadError`` with the path)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the file.

    Attributes:
        name: llama.cpp's tensor name (``blk.0.attn_q.weight``).
        tensor_type: the GGML type of its data.
        dims: dimensions fastest-first, as stored (ggml's ``ne[]``).
        offset: absolute byte offset of its data in the file.
        n_bytes: bytes of its data.
    """

    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape (``dims`` reversed), the Hugging Face orientation."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        return math.prod(self.dims)


class GGUFFile:
    """A GGUF file parsed: ``version``, ``metadata`` (key -> Python value), ``value_types``
    (key -> ``(type, element type or None)``), ``tensors`` (in file order), ``alignment`` and
    ``data_offset``; tensor bytes are read on demand through ``tensor_data``.

    Raises:
        ModelLoadError: the file is missing, not GGUF, of an unsupported version, truncated or
            inconsistent (every message names the file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: GGUF file not found")
        self.size = self.path.stat().st_size
        if self.size < 4:
            raise ModelLoadError(f"{self.path}: not a GGUF file (bad magic number)")
        self._map: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            with memoryview(self._map) as buf:  # released here: no export outlives parsing
                self._parse(buf)
        except _Corrupt as e:
            self.close()
            raise ModelLoadError(f"{self.path}: corrupt or truncated GGUF file ({e})") from None
        except ModelLoadError:
            self.close()
            raise

    # ---------------------------------------------------------------- public API

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (``str``, ``int``, ``float``, ``bool`` or a list), or ``default``."""
        return self.metadata.get(key, default)

    def tensor_data(self, tensor: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a zero-copy, read-only view of the file, shaped like
        ``GGUFReader``'s ``data``: row-major elements for F16/F32/F64/I8-I64, else
        ``[..., row bytes]`` uint8 blocks."""
        if self._map is None:
            raise ValueError(f"{self.path}: GGUF file already closed")
        raw = self._map[tensor.offset : tensor.offset + tensor.n_bytes]
        dtype = _TENSOR_DTYPES.get(tensor.tensor_type)
        if dtype is not None:
            return raw.view(dtype).reshape(tensor.shape)
        block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        return raw.reshape(*tensor.shape[:-1], tensor.shape[-1] // block * type_size)

    def release(self, tensor: GGUFTensorInfo) -> None:
        """Tell the OS this process is done with the tensor's pages (``MADV_DONTNEED``).

        Pages of a file mapping count in the process's RSS once touched; dropping each
        tensor's pages after it has been decoded (or copied) keeps a load's peak at about one
        tensor's bytes instead of the whole file. Safe on this read-only shared map: a later
        read of the range faults the pages back in from the page cache.
        """
        mm = getattr(self._map, "_mmap", None)  # numpy.memmap's mmap.mmap
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = tensor.offset - tensor.offset % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.n_bytes - start)

    def close(self) -> None:
        """Drop this object's map of the file (the OS unmaps it once no view is left)."""
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- parsing

    def _parse(self, buf: memoryview) -> None:
        if bytes(buf[:4]) != _MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (bad magic number)")
        p = _Parser(buf, self.size)
        p.pos = 4
        version = p.scalar(_V.UINT32)
        if version & 0xFFFF == 0 and version:
            raise ModelLoadError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(
                f"{self.path}: unsupported GGUF version {version} "
                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        self.version: int = version
        n_tensors, n_kv = p.scalar(_V.UINT64), p.scalar(_V.UINT64)
        # Each key/value takes >= 13 bytes (key length, type, one byte), each tensor info >= 24.
        p.check_count(n_kv, 13, "metadata key/value pairs")
        p.check_count(n_tensors, 24, "tensor infos")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = p.string()
            if key in self.metadata:
                raise _Corrupt(f"duplicate metadata key {key!r}")
            kind = p.value_type()
            sub = None
            if kind == _V.ARRAY:
                sub = p.value_type()
                self.metadata[key] = p.array(sub, key)
            else:
                self.metadata[key] = p.value(kind)
            self.value_types[key] = (kind, sub)
        infos = [p.tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and (
            self.value_types["general.alignment"][0] != _V.UINT32
            or alignment == 0
            or alignment & (alignment - 1)
        ):
            raise _Corrupt(f"general.alignment must be a power of two (uint32), got {alignment!r}")
        self.alignment: int = alignment
        self.data_offset: int = -(-p.pos // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        names: set[str] = set()
        for name, dims, kind, offset in infos:
            if name in names:
                raise _Corrupt(f"duplicate tensor {name!r}")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, kind, offset))

    def _tensor(
        self, name: str, dims: tuple[int, ...], raw_type: int, offset: int
    ) -> GGUFTensorInfo:
        try:
            kind = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown type {raw_type}") from None
        if (dims[0] if dims else 1) % block:  # a scalar is a row of 1
            raise _Corrupt(f"tensor {name!r}: row of {dims[:1]} is not a whole number of blocks")
        n_elements = math.prod(dims)
        n_bytes = n_elements // block * type_size
        start = self.data_offset + offset
        if start + n_bytes > self.size:
            raise _Corrupt(
                f"tensor {name!r} data (bytes {start}..{start + n_bytes}) runs past the end of "
                f"the file ({self.size} bytes)"
            )
        return GGUFTensorInfo(name, kind, dims, start, n_bytes)


class _Parser:
    """Bounds-checked little-endian reads from a buffer, advancing ``pos``."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> int:
        """Reserve ``n`` bytes at ``pos``; return where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Corrupt(f"{what} at offset {start} needs {n} bytes; the file has {self.size}")
        self.pos = start + n
        return start

    def check_count(self, count: int, min_bytes: int, what: str) -> None:
        """Refuse a count whose entries could not fit in the rest of the file."""
        if count * min_bytes > self.size - self.pos:
            raise _Corrupt(f"{count} {what} cannot fit in the {self.size - self.pos} bytes left")

    def scalar(self, kind: GGUFValueType) -> Any:
        fmt, size, _ = _SCALARS[kind]
        return struct.unpack_from(fmt, self.buf, self.need(size, kind.name))[0]

    def value_type(self) -> GGUFValueType:
        raw = self.scalar(_V.UINT32)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"unknown metadata value type {raw} at offset {self.pos - 4}") from None

    def string(self) -> str:
        n = self.scalar(_V.UINT64)
        start = self.need(n, "string")
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"string at offset {start} is not UTF-8 ({e.reason})") from None

    def value(self, kind: GGUFValueType) -> Any:
        if kind == _V.STRING:
            return self.string()
        if kind == _V.ARRAY:
            raise _Corrupt(f"nested arrays are not supported (offset {self.pos})")
        return self.scalar(kind)

    def array(self, sub: GGUFValueType, key: str) -> list[Any]:
        count = self.scalar(_V.UINT64)
        if sub in _SCALARS:
            _, size, dtype = _SCALARS[sub]
            start = self.need(count * size, f"array {key!r} of {count} {sub.name}")
            return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()
        if sub != _V.STRING:
            raise _Corrupt(f"array {key!r} of {sub.name} is not supported")
        self.check_count(count, 8, f"strings in array {key!r}")
        # One pass, one Python str per element; the loop is the hot path of a vocabulary.
        buf, size, pos, out = self.buf, self.size, self.pos, []
        unpack, append = struct.Struct("<Q").unpack_from, out.append
        try:
            for _ in range(count):
                if pos + 8 > size:
                    raise _Corrupt(f"array {key!r} runs past the end of the file")
                (n,) = unpack(buf, pos)
                pos += 8
                if pos + n > size:
                    raise _Corrupt(f"string of {n} bytes at offset {pos} in {key!r} runs past EOF")
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise _Corrupt(f"string at offset {pos} in {key!r} is not UTF-8 ({e.reason})") from None
        self.pos = pos
        return out

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.scalar(_V.UINT32)
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        start = self.need(8 * n_dims, f"dimensions of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, start)
        return name, dims, self.scalar(_V.UINT32), self.scalar(_V.UINT64)

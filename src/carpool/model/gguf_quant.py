"""llama.cpp's GGUF blocks read as the codes and scales of carpool's int8 / int4 kernels.

Block layouts (ggml-common.h):

- Q8_0, 34 bytes per 32 weights: ``d`` (fp16), 32 x int8 ``q``; ``w = d q``.
- Q4_0, 18 bytes per 32: ``d`` (fp16), 16 bytes of nibbles; ``w = d (q - 8)``.
- Q4_1, 20 bytes per 32: ``d``, ``m`` (fp16), 16 bytes of nibbles; ``w = d q + m``.
  Byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble.
- Q4_K, 144 bytes per 256 (a "super-block" of 8 sub-blocks of 32): ``d``, ``dmin`` (fp16),
  12 bytes of 6-bit sub-block scales ``sc`` and minima ``m`` (packed as ggml's
  ``get_scale_min_k4`` reads them), then 128 bytes of nibbles, 32 per pair of sub-blocks: byte
  ``j`` of pair ``p`` holds weight ``j`` of sub-block ``2p`` in its low nibble and of ``2p + 1``
  in its high one; ``w = d sc_s q - dmin m_s`` in sub-block ``s``.
- Q6_K, 210 bytes per 256: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales
  ``sc`` (one per 16 weights), ``d`` (fp16); ``w = d sc_s (q - 32)`` with 6-bit ``q``.

Q4_0 / Q4_1 / Q4_K become int4 groups of 32 exactly (``scale = d``, ``minimum = m`` or
``-8 d``; Q4_K: ``scale = d sc_s``, ``minimum = -dmin m_s``, both exact in float32).

Q8_0's per-block scale does not fit the int8 kernel's one scale per output row: the codes are
re-rounded to the row's largest block scale rounded *up* to bfloat16 (the kernels keep scales in
bfloat16, see ``quant.py``; rounding up keeps every code within +-127),
``q' = round(q d / d_max)``, an error of at most ``d_max / 2`` per weight (measured on
SmolLM2-135M's embedding: see BENCHMARKS.md).

The other block types fit neither kernel's groups (``quant_plan.REROUNDED``; Q6_K: 6 bits, 16
weights a scale; Q5_0 / Q5_1 / Q5_K: 5 bits; Q2_K / Q3_K: 2-3 bits, 16 weights a scale; the IQ
types: codebooks of lattice points or non-linear levels): their weights (gguf-py's
dequantization) are re-rounded to int8 with one scale per row likewise (``requantize_rows``),
an error of at most half the row's scale per weight: finer than their own grids for a row of
like blocks, and a byte a weight where dequantizing held four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from carpool.model.quant import (
    int4_packable,
    pack_int4_rows,
    row_abs_max,
    row_slices,
    unpack_int4_rows,
)
from carpool.model.quant_plan import GGUF_METHODS, REROUNDED

_BLOCK = 32
_SUPER = 256  # weights per K-quant super-block
_Q4_K_BYTES = 144


@dataclass(frozen=True)
class QuantWeight:
    """One checkpoint matrix in a kernel's terms, before packing.

    Attributes:
        method: ``int8`` (codes int8, ``scale`` ``[N]``) or ``int4`` (codes uint8 in 0..15,
            ``scale`` and ``minimum`` ``[N, K/32]``, ``w = scale q + minimum``).
        codes: ``[N, K]``, or for ``packed`` int4 codes ``[N, K/2]``.
        scale: float32 scales (or the kernel dtype's, which are exact in it).
        minimum: float32 group minima (int4 only).
        packed: int4 codes already in the CPU kernel's layout (``quant.pack_int4_rows``; N
            ``quant.int4_packable``), built a slice at a time so that a large matrix's one-byte
            codes are never whole.
    """

    method: str
    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None
    packed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]) * (2 if self.packed else 1))

    def code_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The one-byte codes of rows ``[r0, r1)`` (``[r1 - r0, K]``; unpacked if ``packed``)."""
        if not self.packed:
            return self.codes[r0:r1]
        return unpack_int4_rows(self.codes, torch.arange(r0, r1), self.shape[1])

    @staticmethod
    def concat(parts: list[QuantWeight]) -> QuantWeight:
        """Shards of a fused matrix stacked along the output rows (all of one method; packed
        shards stay packed when all are: each is whole row blocks)."""
        method = parts[0].method
        assert all(p.method == method for p in parts), [p.method for p in parts]
        mins = None if method == "int8" else torch.cat([p.minimum for p in parts])  # type: ignore[misc]
        packed = all(p.packed for p in parts)
        codes = [p.codes if packed else p.code_rows(0, p.shape[0]) for p in parts]
        return QuantWeight(
            method, torch.cat(codes), torch.cat([p.scale for p in parts]), mins, packed
        )


def gguf_method(type_name: str) -> str | None:
    """The kernel a GGUF tensor type maps onto (``int8``/``int4``), or None (dequantize)."""
    return GGUF_METHODS.get(type_name)


def decode_blocks(
    raw: np.ndarray, type_name: str, shape: tuple[int, int], pack: bool = False
) -> QuantWeight:
    """Read a Q8_0/Q4_0/Q4_1/Q4_K or ``REROUNDED`` tensor's bytes (``[N, row bytes]`` uint8)
    as a ``QuantWeight``; ``pack``: int4 codes in the kernel's layout where N allows
    (``QuantWeight.packed``), decoded and packed a slice of rows at a time."""
    n, k = shape
    if type_name == "Q4_K":
        return _decode_q4_k(raw, n, k, pack)
    if type_name in REROUNDED:
        return _rerounded(raw, type_name, n, k)
    blocks = np.asarray(raw).reshape(n, k // _BLOCK, -1)  # [N, K/32, block bytes]
    if type_name == "Q8_0":
        return _decode_q8_0(blocks, n, k)
    d = _fp16(blocks[..., 0:2])  # [N, K/32]
    if type_name == "Q4_0":
        start, m = 2, -8 * d
    elif type_name == "Q4_1":
        start, m = 4, _fp16(blocks[..., 2:4])
    else:
        raise ValueError(f"no kernel for GGUF type {type_name}")
    return _int4(
        n, k, lambda r0, r1: _nibbles(blocks[r0:r1, :, start:]).reshape(r1 - r0, k), d, m, pack
    )


def _decode_q8_0(blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    """Q8_0 blocks ``[N, K/32, 34]`` as int8 codes with one scale per row: the row's largest
    block scale rounded up to bf16, each block's codes re-rounded by its scale over that one.
    A slice of rows at a time (``row_slices``), the block scales too: whole ``[N, K/32]``
    float32 scales and ratios were 2 x 33 MB for a 1.5 B model's head, 4,096-row slices a 32 MiB
    temporary at its width (2,048)."""
    codes = torch.empty(n, k, dtype=torch.int8)
    d_max = torch.empty(n, dtype=torch.float32)
    for r0, r1 in row_slices(n, k):
        d = _fp16(blocks[r0:r1, :, 0:2])  # [R, K/32]
        top = _ceil_bf16(d.amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny))  # [R]
        ratio = d.div_(top[:, None])  # in (0, 1]
        q = torch.from_numpy(blocks[r0:r1, :, 2:].copy().view(np.int8))
        # In place on one float32 temporary (no more allocations: 3.1x on 8192 x 2048), the
        # integral result copied straight into the codes.
        requant = q.float().mul_(ratio[:, :, None])
        requant.round_().clamp_(-127, 127)
        codes[r0:r1].view_as(requant).copy_(requant)
        d_max[r0:r1] = top
    return QuantWeight("int8", codes, d_max)


def _int4(
    n: int,
    k: int,
    codes: Callable[[int, int], torch.Tensor],
    scale: torch.Tensor,
    minimum: torch.Tensor,
    pack: bool,
) -> QuantWeight:
    """An int4 ``QuantWeight`` from ``codes(r0, r1)`` (one-byte codes of rows ``[r0, r1)``):
    packed a slice at a time where asked and N allows, else the codes whole."""
    if pack and int4_packable(n):
        return QuantWeight("int4", pack_int4_rows(n, k, codes), scale, minimum, packed=True)
    return QuantWeight("int4", codes(0, n), scale, minimum)


def _decode_q4_k(raw: np.ndarray, n: int, k: int, pack: bool = False) -> QuantWeight:
    """Q4_K super-blocks as int4 groups of 32: each sub-block's scale ``d sc`` and minimum
    ``-dmin m`` (products of an fp16 and a 6-bit integer: exact in float32)."""
    blocks = np.asarray(raw).reshape(n, k // _SUPER, _Q4_K_BYTES)  # [N, K/256, 144]
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])  # [N, K/256]
    packed = blocks[..., 4:16]  # the 12 bytes of scales and minima
    sc = np.empty(blocks.shape[:2] + (8,), dtype=np.uint8)
    m = np.empty_like(sc)
    # ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
    # (minima); 4-7 in the nibbles of bytes 8-11, their top two bits in bytes 0-7's top bits.
    sc[..., :4] = packed[..., 0:4] & 63
    m[..., :4] = packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 0xF) | ((packed[..., 0:4] >> 6) << 4)
    m[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    scale = d[..., None] * torch.from_numpy(sc).float()  # [N, K/256, 8]
    minimum = -(dmin[..., None] * torch.from_numpy(m).float())

    def codes(r0: int, r1: int) -> torch.Tensor:
        qs = blocks[r0:r1, :, 16:].reshape(r1 - r0, k // _SUPER, 4, 1, 32)  # sub-block pairs
        both = np.concatenate((qs & 0xF, qs >> 4), axis=3)  # [R, K/256, 4, 2, 32]: 2p + h
        return torch.from_numpy(both.reshape(r1 - r0, k))

    return _int4(n, k, codes, scale.reshape(n, -1), minimum.reshape(n, -1), pack)


def _rerounded(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantWeight:
    """A ``REROUNDED`` type's rows as int8 codes with one scale per row (``requantize_rows``),
    in slices of rows so that the float32 weights of a large embedding are never whole."""
    rows = np.asarray(raw).reshape(n, -1)
    qtype = GGMLQuantizationType[type_name]
    return _requantize_in_slices(
        n, k, lambda r0, r1: torch.from_numpy(dequantize(rows[r0:r1], qtype).reshape(-1, k))
    )


def _requantize_in_slices(
    n: int, k: int, weights: Callable[[int, int], torch.Tensor]
) -> QuantWeight:
    """``requantize_rows`` of an ``[N, K]`` matrix whose float32 rows ``weights(r0, r1)``
    gives, a slice of rows at a time, each slice's codes written into the one result (no
    float32 matrix, no second copy of the codes)."""
    codes = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    for r0, r1 in row_slices(n, k):
        part = requantize_rows(weights(r0, r1))
        codes[r0:r1] = part.codes
        scale[r0:r1] = part.scale
    return QuantWeight("int8", codes, scale)


def requantize_rows(w: torch.Tensor) -> QuantWeight:
    """Float32 weights ``[N, K]`` as int8 codes with one scale per row: the row's largest
    magnitude / 127 rounded *up* to bfloat16 (what the kernel stores, so no code leaves
    +-127), codes rounded to nearest: an error of at most half the row's scale per weight."""
    w = w.float()
    largest = row_abs_max(w)  # max |w|, without |w| whole
    scale = _ceil_bf16((largest / 127.0).clamp(min=torch.finfo(torch.float32).tiny))
    requant = w / scale[:, None]
    requant.round_().clamp_(-127, 127)
    return QuantWeight("int8", requant.to(torch.int8), scale)


def as_int8(qw: QuantWeight) -> QuantWeight:
    """``qw`` in int8 codes with one scale per row (an int4 one's weights re-rounded by
    ``requantize_rows``): a fused matrix whose shards arrive in both kernels' terms (a Q4_K_M
    file's q/k in Q4_K beside v in Q6_K) is held as one int8 matrix."""
    if qw.method == "int8":
        return qw
    assert qw.minimum is not None
    n, k = qw.shape
    scale, minimum = qw.scale, qw.minimum

    def dense(r0: int, r1: int) -> torch.Tensor:
        groups = qw.code_rows(r0, r1).float().view(r1 - r0, -1, _BLOCK)
        return (groups * scale[r0:r1, :, None] + minimum[r0:r1, :, None]).view(r1 - r0, k)

    return _requantize_in_slices(n, k, dense)


def _ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= ``x`` (positive, finite float32), as float32."""
    bits = x.view(torch.int32)
    # A bfloat16 is a float32 whose low 16 bits are zero: round those bits up.
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def _fp16(two_bytes: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 fields ``[..., 2]`` uint8 as float32 ``[...]``."""
    return torch.from_numpy(
        np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)
    )


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """16 bytes per block -> 32 codes: low nibbles are weights 0..15, high ones 16..31."""
    return torch.from_numpy(np.concatenate((qs & 0xF, qs >> 4), axis=-1))  # [..., 32] uint8

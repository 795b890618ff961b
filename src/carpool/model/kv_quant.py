"""The int8 KV cache: symmetric per-row int8 values with their float32 scale in the same row.

``kv_cache_dtype="int8"`` stores each (token, K or V, kv head) row of ``head_dim`` values as
``head_dim`` int8 values followed by the row's float32 scale (4 bytes): a layer's cache is one
``[num_blocks, block_size, 2, kv_heads, head_dim + 4]`` int8 tensor, so everything that passes
``kv_caches`` around keeps its signature, and a row's scale sits next to its values (one read).
Symmetric: ``scale = amax / 127`` over the row, ``q = round(x * 127 / amax)`` clamped to
``[-127, 127]``, so ``|x - q * scale| <= scale / 2``; an all-zero row gets scale 0 (zeros).

Why int8 with a per-row scale rather than a plain 8-bit float: decode attention reads the whole
cache every step at the memory's speed (BENCHMARKS.md, issue 11 item 3), so halving its bytes
halves attention's time; a scale per 64-128 values keeps the error at half a step of 1/127 of
the row's largest value (fp8 e4m3 would keep 3 mantissa bits per value).

These are the torch-op versions (any device); on the CPU the write goes through the C++
``carpool::kv_store_int8`` (``paged_attention.store_int8``), which computes the same bytes in
one call instead of ~10 small ops per layer.
"""

from __future__ import annotations

import torch

from carpool.model_config import KV_CACHE_DTYPES, KV_INT8_SCALE_BYTES

SCALE_BYTES = KV_INT8_SCALE_BYTES  # one float32 scale per row


def effective_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, quantized: bool) -> str:
    """The ``kv_cache_dtype`` name ``"auto"`` stands for: the model's dtype (``"auto"`` as it
    is), but ``"bfloat16"`` for a float32 model whose matrices are quantized.

    Such a model is float32 only for its activations (a GGUF Q8_0/Q4 file computes in float32
    around int8/int4 kernels, as llama.cpp does), and llama.cpp stores its K/V in f16 by
    default: a float32 cache held twice its bytes (SmolLM2-135M Q4_1 at 32 sequences of 96
    tokens: 141 MB against 71, the larger part of its resident memory after torch itself).
    Attention math stays float32; only stored K/V are rounded to bfloat16.
    """
    if kv_cache_dtype == "auto" and model_dtype == torch.float32 and quantized:
        return "bfloat16"
    return kv_cache_dtype


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for an ``EngineConfig.kv_cache_dtype`` value.

    ``auto``: the model's dtype; ``bfloat16``: ``torch.bfloat16`` whatever the model's dtype
    (a float32 model's K/V rounded to bfloat16 when stored; attention math stays float32);
    ``int8``: ``torch.int8`` (the quantized layout above).

    Raises:
        ValueError: ``kv_cache_dtype`` is not one of ``KV_CACHE_DTYPES``.
    """
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one (token, K/V, head) row of a cache of ``dtype``: ``head_dim`` (+ 4 bytes
    of scale when int8)."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` float rows -> ``[..., D + 4]`` int8 rows, each with its scale packed last."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    # 127 / amax, not / scale: the C++ store computes exactly this, so both write equal bytes.
    # A tensor by a tensor: torch's `127.0 / amax` multiplies by amax's reciprocal, 1 ulp off
    # the division in ~25% of rows, which moved a value across a rounding tie (2 of 2M).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = (xf * inv).round_().clamp_(-127, 127).to(torch.int8)
    scale = (amax / 127.0).contiguous()  # [..., 1] float32
    return torch.cat((q, scale.view(torch.int8)), dim=-1)  # the scale's 4 bytes, in place


def dequantize(
    rows: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``[..., D + 4]`` int8 rows -> ``[..., D]`` values ``q * scale`` in ``dtype`` (into ``out``
    when given: its shape is ``rows``' with ``D`` last)."""
    d = rows.shape[-1] - SCALE_BYTES
    # The scale's 4 bytes -> one float32: a copy makes them contiguous, then reinterpret.
    scale = rows[..., d:].contiguous().view(torch.float32)  # [..., 1]
    if out is None:
        out = torch.empty((*rows.shape[:-1], d), dtype=dtype, device=rows.device)
    return torch.mul(rows[..., :d], scale, out=out)


def store(cache: torch.Tensor, slots: torch.Tensor, new_kv: torch.Tensor) -> None:
    """Quantize ``new_kv`` (``[T, 2, K, D]``) into ``cache``'s flat slots (torch ops)."""
    t, two, kvh, d = new_kv.shape
    flat = cache.view(-1, two, kvh, d + SCALE_BYTES)
    flat.index_copy_(0, slots, quantize(new_kv))

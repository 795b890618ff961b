"""The int8 KV cache: symmetric per-row int8 values with their float32 scale.

``kv_cache_dtype="int8"`` quantizes each (token, K or V, kv head) row of ``head_dim`` values to
``head_dim`` int8 values and the row's float32 scale (4 bytes): ``head_dim + 4`` bytes a row, so
a layer's cache is one ``[num_blocks, block_size, 2, kv_heads, head_dim + 4]`` int8 tensor and
everything that passes ``kv_caches`` around (block copies, memory estimates) keeps its shape.
Symmetric: ``scale = amax / 127`` over the row, ``q = round(x * 127 / amax)`` clamped to
``[-127, 127]``, so ``|x - q * scale| <= scale / 2``; an all-zero row gets scale 0 (zeros).

**Block layout.** The shape names the bytes a block holds, not their order: inside a block,
each kv head has one region of ``2 * block_size * (head_dim + 4)`` bytes, in kv-head order:

- K values, word-major: ``[head_dim / 4 words][block_size tokens][4 bytes]``, i.e. the 4
  values of word ``w`` of every token side by side (``block_parts``' ``k_words``);
- K scales: ``[block_size]`` float32;
- V values as rows: ``[block_size][head_dim]``;
- V scales: ``[block_size]`` float32.

Why: the CPU decode kernel multiplies int8 keys by an int8 query in VPDPBUSD, which sums the 4
products of one 32-bit word into each of 16 lanes; with a word of 16 tokens in one 64-byte line
each instruction adds 4 products to 16 tokens' scores, where rows (one token's 64 values a line)
first had to be transposed, 64 shuffles per 16 tokens (1.10-1.18x on the kernel; BENCHMARKS.md,
issue 11, thirteenth pass). The scales of 16 tokens load as one vector. Rows are the form of
``quantize`` / ``dequantize``; ``to_blocks`` / ``from_blocks`` convert whole blocks, and
``store`` / ``dequantize_blocks`` (the gather path) go through ``block_parts``' strided views.
``head_dim`` must be a multiple of 4 (words).

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


def check_head_dim(head_dim: int) -> None:
    """Raise ``ValueError`` unless an int8 cache can hold ``head_dim``-value rows (the block
    layout stores K in 4-byte words)."""
    if head_dim % 4:
        raise ValueError(
            f"kv_cache_dtype='int8' needs a head_dim that is a multiple of 4, got {head_dim}"
        )


def block_parts(
    blocks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided views of int8 cache blocks (``[N, S, 2, K, D + 4]``, each block contiguous) in
    the block layout of this module's docstring, indexed by (block, token, kv head):

    ``k_words [N, S, K, D / 4, 4]``, ``k_scales [N, S, K, 4]`` (a float32's bytes),
    ``v [N, S, K, D]``, ``v_scales [N, S, K, 4]``. Writes through them land in ``blocks``.
    """
    n, s, two, k, r = blocks.shape
    assert two == 2 and blocks.dtype == torch.int8, (blocks.shape, blocks.dtype)
    assert n == 0 or blocks[0].is_contiguous(), "int8 cache blocks must be contiguous"
    d = r - SCALE_BYTES
    check_head_dim(d)
    region = 2 * s * r  # one kv head's bytes in a block
    bstride, off = blocks.stride(0), blocks.storage_offset()
    k_words = blocks.as_strided((n, s, k, d // 4, 4), (bstride, 4, region, 4 * s, 1), off)
    k_scales = blocks.as_strided((n, s, k, 4), (bstride, 4, region, 1), off + d * s)
    v = blocks.as_strided((n, s, k, d), (bstride, d, region, 1), off + r * s)
    v_scales = blocks.as_strided((n, s, k, 4), (bstride, 4, region, 1), off + r * s + d * s)
    return k_words, k_scales, v, v_scales


def _row_parts(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of quantized rows (``[..., 2, K, D + 4]``) matching ``block_parts``' four parts:
    K values as words ``[..., K, D / 4, 4]``, K scale bytes, V values, V scale bytes."""
    d = rows.shape[-1] - SCALE_BYTES
    k, v = rows[..., 0, :, :], rows[..., 1, :, :]
    return k[..., :d].unflatten(-1, (d // 4, 4)), k[..., d:], v[..., :d], v[..., d:]


def to_blocks(rows: torch.Tensor) -> torch.Tensor:
    """Blocks of quantized rows (``[N, S, 2, K, D + 4]`` as ``quantize`` returns them) -> the
    cache's block layout (same shape)."""
    out = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
    for part, row_part in zip(block_parts(out), _row_parts(rows), strict=True):
        part.copy_(row_part)
    return out


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Cache blocks (block layout, ``[N, S, 2, K, D + 4]``) -> the same blocks as quantized
    rows (each row's values, then its scale's 4 bytes)."""
    out = torch.empty(blocks.shape, dtype=torch.int8, device=blocks.device)
    for part, row_part in zip(block_parts(blocks), _row_parts(out), strict=True):
        row_part.copy_(part)
    return out


def dequantize_blocks(
    blocks: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Cache blocks (block layout, ``[N, S, 2, K, D + 4]``) -> ``[N, S, 2, K, D]`` values
    ``q * scale`` in ``dtype`` (into ``out`` when given), read through ``block_parts``' views:
    one multiply each for K and V, no row-form copy."""
    n, s, _, k, r = blocks.shape
    d = r - SCALE_BYTES
    k_words, k_scales, v, v_scales = block_parts(blocks)
    if out is None:
        out = torch.empty((n, s, 2, k, d), dtype=dtype, device=blocks.device)
    # The scales' bytes -> float32 (a small copy makes them contiguous, then reinterpret).
    ks = k_scales.contiguous().view(torch.float32)  # [N, S, K, 1]
    vs = v_scales.contiguous().view(torch.float32)
    torch.mul(k_words, ks.unsqueeze(-1), out=out[:, :, 0].unflatten(-1, (d // 4, 4)))
    torch.mul(v, vs, out=out[:, :, 1])
    return out


def store(cache: torch.Tensor, slots: torch.Tensor, new_kv: torch.Tensor) -> None:
    """Quantize ``new_kv`` (``[T, 2, K, D]``) into ``cache``'s slots (``block * S + offset``),
    in the block layout (torch ops)."""
    rows = quantize(new_kv)  # [T, 2, K, D + 4]
    s = cache.shape[1]
    block, token = slots // s, slots % s
    for part, row_part in zip(block_parts(cache), _row_parts(rows), strict=True):
        part[block, token] = row_part

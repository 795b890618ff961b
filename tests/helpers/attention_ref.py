"""References for the paged decode kernel's tests: random paged caches and the gather + SDPA
path the kernel replaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carpool.model import kv_layout, kv_quant
from carpool.model.attention import GatherBuffer


def gather_sdpa(q, kv_cache, tables, lens, scale):
    """The gather path of ``Attention.forward`` for a decode step: gather whole blocks into a
    rectangle, mask each row to its length, one SDPA (fp32 math)."""
    b, h, d = q.shape
    kvh = kv_cache.shape[3]
    kv = GatherBuffer().take((tables.numel(), *kv_cache.shape[1:]), kv_cache)
    torch.index_select(kv_cache, 0, tables.view(-1), out=kv)
    if kv.dtype == torch.bfloat16:  # kv_layout's block layout -> rows
        kv = kv_layout.rows_of_blocks(kv, torch.bfloat16)
    keys, values = kv.view(b, -1, 2, kvh, d).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.arange(keys.shape[2])[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None],
        keys.float(),
        values.float(),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=h != kvh,
    )
    return out[:, :, 0]  # [B, H, D]


def random_case(dtype, heads, kv_heads, head_dim, block_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks + 7
    kv = torch.randn(num_blocks, block_size, 2, kv_heads, head_dim, generator=g).to(dtype)
    if dtype == torch.bfloat16:  # the cache's block layout
        kv = kv_layout.to_blocks(kv)
    # Random, non-contiguous, non-increasing block ids, disjoint between sequences.
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: len(lens) * max_blocks].view(len(lens), max_blocks).contiguous()
    # The query as the attention layer passes it: a strided view into a fused qkv row.
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    return qkv[:, :heads], kv, tables, torch.tensor(lens, dtype=torch.long)


def int8_case(heads, kv_heads, head_dim, block_size, lens, qdtype, seed=0):
    """random_case's shapes over an int8 cache (``kv_cache_dtype="int8"``, its block layout) of
    random values."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks + 5
    x = torch.randn(num_blocks, block_size, 2, kv_heads, head_dim, generator=g)
    cache = kv_quant.to_blocks(kv_quant.quantize(x))  # the cache's block layout
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: len(lens) * max_blocks].view(len(lens), max_blocks).contiguous()
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, head_dim, generator=g).to(qdtype)
    return qkv[:, :heads], cache, tables, torch.tensor(lens, dtype=torch.long)


def dequantized_sdpa(q, cache, tables, lens, scale):
    """Reference: gather the sequences' blocks, dequantize to float32, masked SDPA."""
    b, h, d = q.shape
    kvh = cache.shape[3]
    kv = kv_quant.dequantize_blocks(cache[tables.view(-1)], torch.float32).view(b, -1, 2, kvh, d)
    keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.arange(keys.shape[2])[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None],
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=h != kvh,
    )
    return out[:, :, 0]


def quantized_query_sdpa(q, cache, tables, lens, scale):
    """Reference for the int8 cache's integer dot-product loops (``int8_attention.h``): each
    query head's 64-value chunks of ``q * scale`` rounded to int8 with their own scale, as the
    kernel does, then the dequantized cache's attention in float64 (the kernel's int16 softmax
    weights are the one rounding left)."""
    b, h, d = q.shape
    # The cache's own row quantization (the same arithmetic as the kernel's) on 64-value rows.
    chunks = kv_quant.quantize((q.float() * scale).view(b, h, d // 64, 64))
    deq = kv_quant.dequantize(chunks, torch.float32).double().view(b, h, d)
    kvh = cache.shape[3]
    kv = kv_quant.dequantize_blocks(cache[tables.view(-1)], torch.float32).view(b, -1, 2, kvh, d)
    keys, values = kv.double().permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.arange(keys.shape[2])[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(
        deq[:, :, None],
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=1.0,
        enable_gqa=h != kvh,
    )
    return out[:, :, 0].float()

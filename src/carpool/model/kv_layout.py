"""The bfloat16 KV cache's block layout: keys as pairs side by side across a block's tokens.

A layer's bfloat16 cache is one ``[num_blocks, block_size, 2, kv_heads, head_dim]`` tensor, as
a float32 one is, so everything that passes ``kv_caches`` around (block copies, prefix
sharing, memory estimates) keeps its shape. The shape names the values a block holds, not
their order: inside a block, each kv head has one region of ``2 * block_size * head_dim``
values, in kv-head order (the int8 cache's layout, ``kv_quant.py``, without its scales):

- K values, pair-major: ``[head_dim / 2 pairs][block_size tokens][2]``, i.e. the 2 values of
  pair ``p`` of every token side by side (``block_parts``' ``k_pairs``);
- V values as rows: ``[block_size][head_dim]``.

Why: the CPU decode kernel's scores are dot products of a query and each key. With keys as
rows (a token's 64 values in a line) every 16 scores took a 16-vector reduction tree after the
products, about as many instructions as the products themselves; with pair ``p`` of 16 tokens
in one 64-byte line, one VDPBF16PS (or two FMAs of float32 queries) adds a pair's products to
16 tokens' scores, and the scores come out as a vector, no reduction (BENCHMARKS.md, issue 11,
thirty-fourth pass). Values stay rows: the value sums broadcast each token's softmax weight
over its row.

Rows (``[..., 2, K, D]``, what the model computes) go in through ``to_blocks`` (whole blocks)
or ``store`` (slots) and come out through ``rows_of_blocks`` (the gather path), all through
``block_parts``' strided views, so they work on any device. On the CPU the write goes through
the C++ ``carpool::kv_store`` (``paged_attention.store``), which writes the same values.
"""

from __future__ import annotations

import torch


def check_head_dim(head_dim: int) -> None:
    """A bfloat16 cache stores keys as pairs: ``head_dim`` must be even."""
    if head_dim % 2:
        raise ValueError(f"a bfloat16 KV cache needs an even head_dim, got {head_dim}")


def block_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided views of bfloat16 cache blocks (``[N, S, 2, K, D]``, each block contiguous) in
    this module's block layout, indexed by (block, token, kv head): ``k_pairs [N, S, K, D / 2,
    2]`` and ``v [N, S, K, D]``. Writes through them land in ``blocks``."""
    n, s, two, k, d = blocks.shape
    assert two == 2 and blocks.dtype == torch.bfloat16, (blocks.shape, blocks.dtype)
    assert n == 0 or blocks[0].is_contiguous(), "bfloat16 cache blocks must be contiguous"
    check_head_dim(d)
    region = 2 * s * d  # one kv head's values in a block
    bstride, off = blocks.stride(0), blocks.storage_offset()
    k_pairs = blocks.as_strided((n, s, k, d // 2, 2), (bstride, 2, region, 2 * s, 1), off)
    v = blocks.as_strided((n, s, k, d), (bstride, d, region, 1), off + s * d)
    return k_pairs, v


def _row_parts(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of rows (``[..., 2, K, D]``) matching ``block_parts``' two parts."""
    d = rows.shape[-1]
    return rows[..., 0, :, :].unflatten(-1, (d // 2, 2)), rows[..., 1, :, :]


def to_blocks(rows: torch.Tensor) -> torch.Tensor:
    """Blocks of rows (``[N, S, 2, K, D]``, any float dtype) -> bfloat16 cache blocks in this
    module's layout (same shape; values rounded to bfloat16 as ``Tensor.to`` rounds them)."""
    out = torch.empty(rows.shape, dtype=torch.bfloat16, device=rows.device)
    for part, row_part in zip(block_parts(out), _row_parts(rows), strict=True):
        part.copy_(row_part)
    return out


def rows_of_blocks(
    blocks: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Cache blocks (``[N, S, 2, K, D]``, this module's layout) -> ``[N, S, 2, K, D]`` rows in
    ``dtype`` (into ``out`` when given): one copy each for K and V, widened on the way where
    ``dtype`` is float32 (a float32 model's bfloat16 cache)."""
    if out is None:
        out = torch.empty(blocks.shape, dtype=dtype, device=blocks.device)
    for part, row_part in zip(block_parts(blocks), _row_parts(out), strict=True):
        row_part.copy_(part)
    return out


def store(cache: torch.Tensor, slots: torch.Tensor, new_kv: torch.Tensor) -> None:
    """Write ``new_kv`` (``[T, 2, K, D]``, float32 or bfloat16) into the bfloat16 ``cache``'s
    slots (``block * S + offset``), in this module's layout (torch ops)."""
    s = cache.shape[1]
    block, token = slots // s, slots % s
    for part, row_part in zip(block_parts(cache), _row_parts(new_kv), strict=True):
        part[block, token] = row_part.to(cache.dtype)

"""Attention over a paged KV cache, for a ragged batch of sequences.

One step's tokens arrive flat (``[T, ...]``): prefill chunks and single decode tokens of many
sequences packed end to end. Each layer
1. writes the new K and V of every token into its slot of the paged cache (one copy a token,
   ``paged_attention.store``: the cache keeps a token's K and V side by side; an int8 cache
   quantizes them on the way, see ``carpool.model.kv_quant``),
2. gathers each sequence's keys and values block by block through its block table (one
   ``index_select`` of whole blocks: contiguous copies, a few indices),
3. runs ``scaled_dot_product_attention`` over a ``[B, Q, L]`` rectangle whose mask encodes
   causality, one call per tile of prompt positions over the keys to the tile's end
   (``AttentionMetadata.query_chunks``: a call's shape follows from the positions alone, so a
   row computes the same bits however its prompt is chunked and batched),
so there is no Python loop over sequences. Decode rows on the CPU skip 2 and 3: the kernel of
``carpool.model.paged_attention`` reads the cache in place through the block tables; so do a
prompt's rows at short contexts, and every prompt row of grouped heads over a bf16 cache on a
CPU without AMX (``paged_attention.prompt_kernel_positions``). All index
tensors are built once per step by the runner (``carpool.worker.batch``) and shared by every
layer through ``AttentionMetadata``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from carpool.config import ModelConfig
from carpool.model import kernel_build, kv_layout, kv_quant, paged_attention
from carpool.model.layers import Linear, RMSNorm, RotaryEmbedding, rotate_in_place
from carpool.model.row_paths import WideRows

# A float32 model's prompt rectangles over a bfloat16 (or int8) cache run SDPA in bfloat16 where
# the CPU has AMX: the queries rounded to bf16, K and V gathered as the cache's own bf16 values
# (not widened; an int8 cache's dequantized to bf16, a rounding below the int8 one's), the
# output widened back. torch's CPU flash attention multiplies bf16 on AMX tiles,
# 2.1-3.4x faster than float32 at SmolLM2's shapes (32-512 rows over 512 keys); the default
# model's 1,024 / 2,048-token prefill 1.21x / 1.34x, where attention had been half of the
# latter (1.26x / 1.37x over an int8 cache; BENCHMARKS.md, issue 11, forty-sixth pass). The
# price is bf16 attention for those rows (queries, probabilities and output rounded to 8 bits
# of mantissa, as a bf16 model computes them; llama.cpp rounds them to f16): the cache's keys
# and values are bf16 already. A row's path still follows from its position (the kernel's rows
# below ``paged_attention.prompt_kernel_positions``, decode rows: float32 queries). None: where
# AMX; True / False: forced (tests take either path on any CPU).
BF16_PROMPT_ATTENTION: bool | None = None


def bf16_prompt_attention(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether a prompt rectangle of float32 queries ``q`` over ``kv_cache`` (bf16 or int8)
    runs in bf16 (``BF16_PROMPT_ATTENTION``)."""
    on = BF16_PROMPT_ATTENTION
    if on is None:
        on = kernel_build.amx_tiles()
    return (
        on
        and q.dtype == torch.float32
        and kv_cache.dtype in (torch.bfloat16, torch.int8)
        and kv_cache.device.type == "cpu"
    )


class GatherBuffer:
    """One scratch tensor, reused by every layer of every step for the gathered K/V blocks.

    Layers run one after another and a layer's gathered K/V is dead once its attention is
    done, so one buffer serves them all. Why: a fresh ``index_select`` result of tens of MB
    is a fresh ``mmap`` with a page fault per 4 KiB on first touch; at context 8k, batch 8
    (134 MB per layer) writing into a reused buffer measured 4x faster than a fresh tensor
    (0.2-0.25 s vs 0.9-1.0 s per gather on the shared 2-core machine).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor, slot: str = "kv") -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device (contents undefined).

        ``slot`` names one of several buffers alive at once (an int8 cache's gathered rows and
        their dequantized values).
        """
        n = math.prod(shape)
        buf = self._bufs.get(slot)
        # A buffer made under inference_mode cannot be written outside it (a reference forward
        # under no_grad), and vice versa: make a new one when the mode changed.
        if (
            buf is None
            or buf.numel() < n
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.is_inference() != torch.is_inference_mode_enabled()
        ):
            buf = self._bufs[slot] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


@dataclass
class AttentionMetadata:
    """Index tensors describing one step's batch to the attention layers.

    Shapes: ``T`` flat tokens, ``B`` sequences, ``Q`` longest query chunk, ``L`` longest
    context (cached + new tokens).

    Attributes:
        slot_mapping: ``[T]`` flat cache slot (``block * block_size + offset``) of each new token.
        block_tables: ``[B, L / block_size]`` cache blocks of each sequence, padded with any
            block id (the mask hides what padding blocks hold); ``L`` is a multiple of the
            block size.
        attn_mask: ``[B, 1, Q, L]`` bool, True where a query may attend to a key; None in a
            pure decode step (``context_lens`` set, ``kernel_rows`` None), where each row
            attends to keys ``[0, context_len)`` and the mask is made only if the step takes
            the gather path (the paged kernel needs none: three ops a step saved, each a pass
            through code the weights' stream has just pushed out of the caches).
        query_index: ``[B, Q]`` flat token index of each padded query row, or None when the flat
            tokens already form the ``[B, Q]`` rectangle (every sequence has exactly Q tokens,
            e.g. a pure decode step).
        output_index: ``[T]`` row of the flattened ``[B * Q]`` output holding each flat token,
            or None under the same condition as ``query_index``.
        context_lens: ``[R]`` int64 keys each *kernel row* attends to (its position + 1), or
            None when no row takes the in-place paged decode kernel. Which rows do is fixed
            by the row alone, never by the rest of the batch (see ``build_ragged_batch``), so
            a sequence computes the same numbers alone or in any batch.
        kernel_rows: ``[R]`` flat token index of each kernel row, or None when every row is
            one (a pure decode step: ``T == B``, one row per sequence, ``block_tables`` rows;
            a step of short prompts' rows takes that form too, ``block_tables`` a row per
            token).
        kernel_tables: ``[R, L / block_size]`` the block table of each kernel row's sequence
            (None together with ``kernel_rows``).
        gathered_rows: in a part (below), ``[G]`` flat token index of each step row its
            rectangle covers; its ``block_tables``, ``attn_mask``, ``query_index`` and
            ``output_index`` describe these rows' sequences, indices counted over these rows
            alone. None outside parts.
        parts: the rectangles of a step whose rows take several (the outer ``attn_mask`` then
            None), or None: one rectangle over every row.
            Decode sequences (one kernel row each) are left out of them: the paged kernel
            computes those rows, or where it does not apply, a gather over ``kernel_tables`` and
            ``context_lens`` as in a pure decode step; so are prompt rows below
            ``build_ragged_batch``'s ``kernel_below``. The other rows of prompt chunks share one
            part, or are grouped into several where one would pad more than the parts cost
            (``batch.rectangle_groups``).
        query_chunks: the rectangle's SDPA calls ``(first row, end row, keys)``: one per tile
            of ``batch.PREFILL_TILE_ROWS`` positions, over the keys to the tile's end (see
            ``batch.attention_rectangle``), or None: one call over every row and key (a pure decode
            step's gather).
        wide_rows: the step's rows whose quantized linears take the widened weight (a
            prompt's, ``carpool.model.row_paths``), or None: none (every row the kernels').
            Not attention's, but the step's one hand-off object that reaches the layers.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    attn_mask: torch.Tensor | None
    query_index: torch.Tensor | None = None
    output_index: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    kernel_rows: torch.Tensor | None = None
    kernel_tables: torch.Tensor | None = None
    gathered_rows: torch.Tensor | None = None
    parts: list[AttentionMetadata] | None = None
    query_chunks: tuple[tuple[int, int, int], ...] | None = None
    wide_rows: WideRows | None = None
    _additive: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``attn_mask`` as SDPA's additive form in ``dtype`` (0 where seen, -inf elsewhere),
        made once for every layer of the step. Why: SDPA converts a boolean mask in every call
        (two ``where`` a call: 0.1 s of a 1,984-token prompt's step in 32-row tiles); the values
        it adds are the same, and so are the bits (tested)."""
        assert self.attn_mask is not None, "no mask to convert"
        if self._additive is None or self._additive.dtype != dtype:
            add = torch.zeros(self.attn_mask.shape, dtype=dtype, device=self.attn_mask.device)
            self._additive = add.masked_fill_(~self.attn_mask, float("-inf"))
        return self._additive


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V, rotary positions and a paged cache."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, gather: GatherBuffer | None = None
    ) -> None:
        super().__init__()
        self.gather = gather or GatherBuffer()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: one weight read, one kernel launch.
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: torch.Tensor,  # [T, 2, head_dim]: cos and sign-folded sin (RotaryEmbedding.table)
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [num_blocks, block_size, 2, kv_heads, head_dim (+ 4 if int8)]
    ) -> torch.Tensor:
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj.forward(x).view(t, h + 2 * kvh, d)  # [T, H + 2K, D]
        qk = qkv[:, : h + kvh]
        if self.q_norm is not None and self.k_norm is not None:
            qk.copy_(torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), dim=1))
        # q and k rotated together, in place in qkv: k lands next to v, so one copy per token
        # stores both into the cache.
        rotate_in_place(qk, rope)
        # The new K and V of a token as one [2, K, D] row: a float32 cache's slot is that row;
        # a bfloat16 or int8 cache puts its values in its block layout (kv_layout, kv_quant).
        new_kv = qkv[:, h:].view(t, 2, kvh, d)
        if kv_cache.dtype == torch.int8:  # quantized, in kv_quant's block layout
            paged_attention.store_int8(kv_cache, meta.slot_mapping, new_kv)
        else:  # (a bfloat16 cache of a float32 model: K/V rounded to bfloat16 as stored)
            paged_attention.store(kv_cache, meta.slot_mapping, new_kv)

        use_kernel = meta.context_lens is not None and paged_attention.applies(kv_cache, qkv.dtype)
        if use_kernel and meta.kernel_rows is None:
            # Pure decode: one query per sequence, K/V read in place through the block tables.
            out = paged_attention.paged_decode_attention(
                qkv[:, :h], kv_cache, meta.block_tables, meta.context_lens, self.scale
            )
            return self.o_proj.forward(out.view(t, self.q_size))
        covered = t
        if meta.parts is None:
            out = self._gathered(qkv[:, :h], kv_cache, meta)
        else:  # rectangles over some rows each; decode rows left out are filled below
            covered = sum(
                p.gathered_rows.shape[0] for p in meta.parts if p.gathered_rows is not None
            )
            kernel = 0 if meta.kernel_rows is None else meta.kernel_rows.shape[0]
            # Zeros where a row lies in no rectangle and is no kernel row (a padded layout's
            # pads below the kernel rows' positions: never read, but finite for the next layer).
            make = qkv.new_empty if covered + kernel == t else qkv.new_zeros
            out = make((t, self.q_size))
            for part in meta.parts:
                part_rows = part.gathered_rows
                assert part_rows is not None, "a part names the rows it covers"
                out[part_rows] = self._gathered(qkv[part_rows, :h], kv_cache, part)
        rows = meta.kernel_rows
        if use_kernel:
            # Decode rows of a mixed step take the kernel too (their gathered result is
            # overwritten), so a row's arithmetic never depends on its batch.
            assert rows is not None and meta.kernel_tables is not None
            out[rows] = paged_attention.paged_decode_attention(
                qkv[rows, :h], kv_cache, meta.kernel_tables, meta.context_lens, self.scale
            ).view(-1, self.q_size)
        elif covered < t:  # no kernel here: the rows left out as a pure decode step gathers
            assert rows is not None and meta.kernel_tables is not None
            decode = AttentionMetadata(
                slot_mapping=meta.slot_mapping,
                block_tables=meta.kernel_tables,
                attn_mask=None,
                context_lens=meta.context_lens,
            )
            out[rows] = self._gathered(qkv[rows, :h], kv_cache, decode)
        return self.o_proj.forward(out)

    def _gathered(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``[T, H * D]`` attention of every row: blocks gathered, then SDPA over ``[B, Q, L]``."""
        t = q.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        b = meta.block_tables.shape[0]
        out_dtype = q.dtype
        if meta.query_chunks is not None and bf16_prompt_attention(q, kv_cache):
            q = q.to(torch.bfloat16)  # the rectangle in bf16, K/V gathered in it (see above)
        # One gather of whole blocks brings K and V together (rows of block_size * 2 * K * D
        # elements: twice as long, half as many ops as gathering K and V apart).
        # index_select, not advanced indexing: several times faster for this gather on CPU.
        blocks = meta.block_tables.view(-1)
        shape = (blocks.shape[0], *kv_cache.shape[1:])
        if kv_cache.dtype == torch.bfloat16:
            # bfloat16 blocks (kv_layout's block layout) -> rows in the activation dtype (a
            # float32 model's widened on the way), gathered and laid out in one pass where the
            # CPU operator applies.
            kv = self.gather.take(shape, q, slot="dequantized")
            if not paged_attention.gather_rows(kv_cache, blocks, kv):
                gathered = self.gather.take(shape, kv_cache)
                torch.index_select(kv_cache, 0, blocks, out=gathered)
                kv = kv_layout.rows_of_blocks(gathered, q.dtype, out=kv)
        else:
            kv = self.gather.take(shape, kv_cache)
            torch.index_select(kv_cache, 0, blocks, out=kv)
        if kv_cache.dtype == torch.int8:
            # int8 blocks (kv_quant's block layout) -> the activation dtype, into a second
            # reused buffer.
            deq = self.gather.take((*kv.shape[:-1], d), q, slot="dequantized")
            kv = kv_quant.dequantize_blocks(kv, q.dtype, out=deq)
        kv = kv.view(b, -1, 2, kvh, d)
        # Strided [B, K, L, D] views, no copy: SDPA reads K and V through their strides.
        keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)
        # [B, Q, H, D]: a view when every sequence has Q tokens, else a gather of padded rows.
        queries = q.view(b, t // b, h, d) if meta.query_index is None else q[meta.query_index]
        mask = meta.attn_mask
        if mask is None:  # a pure decode step: row k sees keys [0, context_lens[k])
            assert meta.context_lens is not None and meta.kernel_rows is None and t == b, (
                "attn_mask may be None only in a pure decode step"
            )
            length = keys.shape[2]
            mask = torch.arange(length, device=q.device) < meta.context_lens[:, None]
            mask = mask.view(b, 1, 1, length)
        if meta.query_chunks is None:
            out = F.scaled_dot_product_attention(
                queries.transpose(1, 2),  # [B, H, Q, D]
                keys,
                values,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=h != kvh,
            ).transpose(1, 2)
        else:  # one call per tile of positions, over the keys to its end (attention_rectangle)
            out = queries.new_empty(queries.shape)  # [B, Q, H, D]
            mask = meta.additive_mask(q.dtype)
            for q0, q1, kn in meta.query_chunks:
                out[:, q0:q1] = F.scaled_dot_product_attention(
                    queries[:, q0:q1].transpose(1, 2),
                    keys[:, :, :kn],
                    values[:, :, :kn],
                    attn_mask=mask[..., q0:q1, :kn],
                    scale=self.scale,
                    enable_gqa=h != kvh,
                ).transpose(1, 2)
        out = out.reshape(-1, self.q_size)  # [B * Q, H * D]
        if meta.output_index is not None:
            out = out[meta.output_index]  # [T, H * D]
        return out.to(out_dtype)

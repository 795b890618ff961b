"""Build one step's ragged batch: flat tokens with positions, sequence ids and cache slots.

Like llama.cpp's ``llama_batch``, every token carries its position and its sequence; unlike a
padded rectangle, no compute is spent on padding tokens in the matmuls. Only the attention
needs a ``[B, Q, L]`` view, whose index tensors are built here once for all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from carpool.model.attention import AttentionMetadata


class ChunkLike(Protocol):
    """What the batch builder needs of a scheduled chunk (``ScheduledChunk`` has it)."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_sample: bool


@dataclass
class ModelInput:
    """Tensors for one forward pass plus which request each logits row belongs to."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [R] flat rows that sample
    sample_request_ids: list[str]  # [R] request of each logits row
    num_tokens: int


def build_ragged_batch(
    chunks: Sequence[ChunkLike], block_size: int, device: torch.device | str = "cpu"
) -> ModelInput:
    """Pack ``chunks`` end to end into one ``ModelInput``.

    Args:
        chunks: per sequence, the tokens to compute now, their start position and the block
            table covering ``start_pos + len(token_ids)`` slots.
        block_size: tokens per KV block.
        device: where the tensors go.
    """
    assert chunks, "a batch needs at least one chunk"
    q_lens = [len(c.token_ids) for c in chunks]
    assert min(q_lens) > 0, f"empty chunk in batch: {q_lens}"
    starts = [c.start_pos for c in chunks]
    b, q = len(chunks), max(q_lens)
    ctx = [s + n for s, n in zip(starts, q_lens, strict=True)]
    l = max(ctx)
    max_blocks = -(-l // block_size)
    for c, n in zip(chunks, ctx, strict=True):
        assert len(c.block_table) * block_size >= n, (
            f"request {c.request_id}: block table of {len(c.block_table)} blocks "
            f"cannot hold {n} tokens"
        )
    tables = torch.tensor(
        [(c.block_table + [0] * max_blocks)[:max_blocks] for c in chunks], dtype=torch.long
    )
    input_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
    seq_index = torch.repeat_interleave(torch.arange(b), torch.tensor(q_lens))  # [T]
    offsets = torch.tensor([0, *q_lens]).cumsum(0)  # cumulative lengths [B + 1]
    start_t = torch.tensor(starts)
    local = torch.arange(len(input_ids)) - offsets[seq_index]  # index within its chunk
    positions = start_t[seq_index] + local  # [T]

    j = torch.arange(l)
    kv_slots = tables.gather(1, (j // block_size).expand(b, l)) * block_size + j % block_size
    slot_mapping = kv_slots[seq_index, positions]  # [T]

    i = torch.arange(q)
    q_pos = start_t[:, None] + i[None, :]  # [B, Q] position of each padded query row
    valid = i[None, :] < torch.tensor(q_lens)[:, None]  # [B, Q]
    causal = j[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
    # Padding query rows attend to key 0 only, so no row is fully masked (that would be NaN).
    mask = torch.where(valid[:, :, None], causal, j[None, None, :] == 0).unsqueeze(1)

    query_index = output_index = None
    if min(q_lens) != q:
        query_index = offsets[:-1, None] + torch.minimum(
            i[None, :], torch.tensor(q_lens)[:, None] - 1
        )
        output_index = seq_index * q + local
    sampling = [k for k, c in enumerate(chunks) if c.needs_sample]
    logits_indices = offsets[1:][sampling] - 1 if sampling else torch.zeros(0, dtype=torch.long)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        kv_slots=kv_slots.to(device),
        attn_mask=mask.to(device),
        query_index=None if query_index is None else query_index.to(device),
        output_index=None if output_index is None else output_index.to(device),
    )
    return ModelInput(
        input_ids=input_ids.to(device),
        positions=positions.to(device),
        meta=meta,
        logits_indices=logits_indices.to(device),
        sample_request_ids=[chunks[k].request_id for k in sampling],
        num_tokens=len(input_ids),
    )

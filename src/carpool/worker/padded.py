"""Build one step's *padded* batch: a ``[rows, width]`` rectangle with an attention mask.

The classic static-batch layout, kept to measure what padding costs against the ragged batch
of ``carpool.worker.batch``. Every row is padded to the step's longest chunk and the pad
tokens really go through the model (embedding, every matmul, attention), exactly as a
``model.generate(padded_batch)`` would spend them. Both layouts give the same tokens:

- a pad token's K/V is written to a *scratch block* (a block the ``BlockManager`` never hands
  out, reserved by the runner past the last real block), so it never overwrites a real slot;
- the mask lets real queries attend only to their own real keys, so no pad is ever attended;
- pad queries attend to key 0 of their row only (a fully masked row would give NaN), and their
  outputs are never read.

Seats of a static batch whose request is done (``SchedulerOutput.num_idle_seats``) become rows
made only of pad tokens.

Padding count: ``rows x width - real tokens``, where ``rows = chunks + idle seats`` and
``width`` is the longest chunk of the step (the runner reports it per step,
``ModelRunnerOutput.num_padded_tokens``). The benchmark's padding waste is
``padded / (real + padded)`` summed over steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from carpool.model.attention import AttentionMetadata
from carpool.worker.batch import ChunkLike, ModelInput, to_device

PAD_TOKEN_ID = 0  # any valid id: a pad's output is never read


def build_padded_batch(
    chunks: Sequence[ChunkLike],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    scratch_block: int,
    num_idle_rows: int = 0,
    device: torch.device | str = "cpu",
) -> ModelInput:
    """Lay ``chunks`` out as a padded rectangle, plus ``num_idle_rows`` all-pad rows.

    Args:
        chunks, block_tables, block_size: as for ``build_ragged_batch``.
        scratch_block: id of the KV block that absorbs every pad token's K/V (never attended).
        num_idle_rows: extra rows of pad tokens only (done seats of a static batch).
        device: where the tensors go.

    Returns:
        A ``ModelInput`` whose ``num_tokens`` is ``rows x width`` (real + padded).
    """
    assert chunks, "a batch needs at least one chunk"
    assert num_idle_rows >= 0, num_idle_rows
    q_lens = [len(c.token_ids) for c in chunks]
    assert min(q_lens) > 0, f"empty chunk in batch: {q_lens}"
    rows, width = len(chunks) + num_idle_rows, max(q_lens)
    ctx = [c.start_pos + n for c, n in zip(chunks, q_lens, strict=True)]
    max_blocks = -(-max(ctx) // block_size)
    l = max_blocks * block_size  # attention gathers keys block by block
    for c, table, n in zip(chunks, block_tables, ctx, strict=True):
        assert len(table) * block_size >= n, (
            f"request {c.request_id}: block table of {len(table)} blocks cannot hold {n} tokens"
        )
    # Real tables padded with the scratch block; idle rows point only at the scratch block.
    table_rows = [([*t] + [scratch_block] * max_blocks)[:max_blocks] for t in block_tables]
    table_rows += [[scratch_block] * max_blocks] * num_idle_rows
    tables = torch.tensor(table_rows, dtype=torch.long)  # [R, max_blocks]

    q_len_t = torch.tensor(q_lens + [0] * num_idle_rows)  # [R]
    start_t = torch.tensor([c.start_pos for c in chunks] + [0] * num_idle_rows)  # [R]
    i = torch.arange(width)
    valid = i[None, :] < q_len_t[:, None]  # [R, W] real token?
    tokens = torch.full((rows, width), PAD_TOKEN_ID, dtype=torch.long)
    for r, c in enumerate(chunks):
        tokens[r, : q_lens[r]] = torch.tensor(c.token_ids, dtype=torch.long)
    q_pos = start_t[:, None] + i[None, :]  # [R, W]
    positions = torch.where(valid, q_pos, torch.zeros_like(q_pos))  # pads sit at position 0

    j = torch.arange(l)
    kv_slots = tables.gather(1, (j // block_size).expand(rows, l)) * block_size + j % block_size
    real_slots = kv_slots.gather(1, torch.where(valid, q_pos, torch.zeros_like(q_pos)))
    slot_mapping = torch.where(valid, real_slots, scratch_block * block_size)  # [R, W]

    causal = j[None, None, :] <= q_pos[:, :, None]  # [R, W, L]
    mask = torch.where(valid[:, :, None], causal, j[None, None, :] == 0).unsqueeze(1)

    sampling = [k for k, c in enumerate(chunks) if c.needs_sample]
    logits_indices = torch.tensor([k * width + q_lens[k] - 1 for k in sampling], dtype=torch.long)
    v = to_device(  # one copy off the CPU for the index tensors, one for the mask
        {
            "slot_mapping": slot_mapping.reshape(-1),
            "block_tables": tables,
            "input_ids": tokens.reshape(-1),
            "positions": positions.reshape(-1),
            "logits_indices": logits_indices,
        },
        device,
    )
    meta = AttentionMetadata(
        slot_mapping=v["slot_mapping"],
        block_tables=v["block_tables"],
        attn_mask=mask.to(device),
        # The flat tokens already form the [R, W] rectangle: no gather or scatter needed.
        query_index=None,
        output_index=None,
    )
    return ModelInput(
        input_ids=v["input_ids"],
        positions=v["positions"],
        meta=meta,
        logits_indices=v["logits_indices"],
        sample_request_ids=[chunks[k].request_id for k in sampling],
        num_tokens=rows * width,
    )

"""Build one step's *padded* batch: a ``[rows, width]`` rectangle with an attention mask.

The classic static-batch layout, kept to measure what padding costs against the ragged batch
of ``carpool.worker.batch``. Every row is padded to the step's longest chunk and the pad
tokens really go through the model (embedding, every matmul, attention), exactly as a
``model.generate(padded_batch)`` would spend them. Both layouts give the same tokens, and the
same bits for every real token (the engineering standard: every strategy, padded or not,
computes sequential's greedy tokens; on the default quantized model a row's attention called
in another shape changed greedy tokens, issue 11, thirtieth pass):

- a pad token's K/V is written to a *scratch block* (a block the ``BlockManager`` never hands
  out, reserved by the runner past the last real block), so it never overwrites a real slot;
- attention runs as the ragged batch's does: the rectangle in SDPA calls of
  ``batch.PREFILL_TILE_ROWS`` positions (``batch.attention_rectangle``), a row at position ``p``
  attending to keys ``[0, p]``; generated tokens' rows (``generated_from``) through the paged
  decode kernel, a pure decode step wholly. A row's pads continue its positions in the
  rectangle (so they cost attention as a padded ``generate`` would); idle rows start at 0 over
  the scratch block. No real query ever sees a pad's K/V (pads write only the scratch block),
  and the pads' outputs are never read.

Seats of a static batch whose request is done (``SchedulerOutput.num_idle_seats``) become rows
made only of pad tokens.

Padding count: ``rows x width - real tokens``, where ``rows = chunks + idle seats`` and
``width`` is the longest chunk of the step (the runner reports it per step,
``ModelRunnerOutput.num_padded_tokens``). The benchmark's padding waste is
``padded / (real + padded)`` summed over steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from carpool.model import row_paths
from carpool.worker.batch import (
    ChunkLike,
    ModelInput,
    Rectangle,
    rectangle_parts,
    step_input,
)

PAD_TOKEN_ID = 0  # any valid id: a pad's output is never read


def build_padded_batch(
    chunks: Sequence[ChunkLike],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    scratch_block: int,
    num_idle_rows: int = 0,
    device: torch.device | str = "cpu",
    generated_from: Sequence[int] | None = None,
    kernel_below: int = 0,
    wide_from: int | None = None,
) -> ModelInput:
    """Lay ``chunks`` out as a padded rectangle, plus ``num_idle_rows`` all-pad rows.

    Args:
        chunks, block_tables, block_size, generated_from: as for ``build_ragged_batch``
            (``generated_from``: per chunk, its prompt length; tokens from it on take the paged
            decode kernel; None: every row of a step of one-token chunks does).
        kernel_below: as for ``build_ragged_batch``: rectangles start there (a row's pads
            below it attend to nothing, their output zeros).
        wide_from: as for ``build_ragged_batch`` (pads take the kernels: never read).
        scratch_block: id of the KV block that absorbs every pad token's K/V.
        num_idle_rows: extra rows of pad tokens only (done seats of a static batch).
        device: where the tensors go.

    Returns:
        A ``ModelInput`` whose ``num_tokens`` is ``rows x width`` (real + padded).
    """
    assert chunks, "a batch needs at least one chunk"
    assert num_idle_rows >= 0, num_idle_rows
    real_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
    assert real_lens.min() > 0, f"empty chunk in batch: {real_lens.tolist()}"
    rows, width = len(chunks) + num_idle_rows, int(real_lens.max())
    q_lens = np.concatenate((real_lens, np.zeros(num_idle_rows, dtype=np.int64)))  # [R]
    starts = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=len(chunks))
    starts = np.concatenate((starts, np.zeros(num_idle_rows, dtype=np.int64)))  # [R]
    for c, table, n in zip(chunks, block_tables, starts + q_lens, strict=False):
        assert len(table) * block_size >= n, (
            f"request {c.request_id}: block table of {len(table)} blocks cannot hold {n} tokens"
        )
    # Tables over the real contexts, padded with the scratch block; idle rows point only at
    # it. (The rectangle extends them past a table as for the ragged batch: keys no real
    # query sees.)
    max_blocks = -(-int((starts + q_lens).max()) // block_size)
    tables = np.full((rows, max_blocks), scratch_block, dtype=np.int64)
    for r, table in enumerate(block_tables):
        n = min(len(table), max_blocks)
        tables[r, :n] = table[:n]

    i = np.arange(width)
    valid = i[None, :] < q_lens[:, None]  # [R, W] real token?
    tokens = np.full((rows, width), PAD_TOKEN_ID, dtype=np.int64)
    for r, c in enumerate(chunks):
        tokens[r, : real_lens[r]] = c.token_ids
    q_pos = starts[:, None] + i[None, :]  # [R, W]
    positions = np.where(valid, q_pos, 0)  # pads sit at position 0
    real_slots = (
        np.take_along_axis(tables, positions // block_size, axis=1) * block_size
        + positions % block_size
    )
    slot_mapping = np.where(valid, real_slots, scratch_block * block_size)  # [R, W]

    # Which real tokens take the paged decode kernel: the rule of the ragged batch.
    if generated_from is None:
        is_prompt = valid & (width > 1)
    else:
        firsts = np.concatenate(
            (
                np.fromiter(generated_from, dtype=np.int64, count=len(chunks)),
                np.zeros(num_idle_rows, dtype=np.int64),
            )
        )
        is_prompt = valid & (q_pos < firsts[:, None])
    is_kernel = valid & (~is_prompt | (q_pos < kernel_below))
    wide = None if wide_from is None else row_paths.from_mask(is_prompt & (q_pos >= wide_from))
    mask = query_index = output_index = kernel_rows = kernel_tables = context_lens = None
    query_chunks = None
    parts: list[tuple[np.ndarray, Rectangle]] | None = None
    rect_tables = tables
    if width == 1 and is_kernel[: len(chunks)].all():
        # A pure decode step: every row through the kernel; an idle row sees key 0 of the
        # scratch block (a pad's, finite), its output never read.
        context_lens = np.maximum(starts + q_lens, 1)
    else:
        # Each row's rectangle from position kernel_below on: below it a row's tokens are
        # kernel rows or pads, whose attention is never read (zeros, see Attention.forward).
        # Rows far apart in position (a prompt beside sequences deep in their decode) get
        # rectangles of their own, as the ragged batch groups its prompt chunks.
        lo = np.maximum(starts, kernel_below)
        widths = np.maximum(starts + width - lo, 0)
        parts = rectangle_parts(np.arange(rows) * width, lo, widths, starts, tables, block_size)
        if len(parts) == 1 and len(parts[0][0]) == rows * width:  # one over every row
            mask, query_index, output_index, rect_tables, query_chunks = parts[0][1]
            parts = None
        if is_kernel.any():
            kernel_rows = np.flatnonzero(is_kernel.reshape(-1))
            context_lens = q_pos.reshape(-1)[kernel_rows] + 1
            kernel_tables = tables[kernel_rows // width]

    sampling = [k for k, c in enumerate(chunks) if c.needs_sample]
    logits_indices = np.array([k * width + real_lens[k] - 1 for k in sampling], dtype=np.int64)
    return step_input(
        {
            "slot_mapping": slot_mapping.reshape(-1),
            "block_tables": rect_tables,
            "input_ids": tokens.reshape(-1),
            "positions": positions.reshape(-1),
            "logits_indices": logits_indices,
            "query_index": query_index,
            "output_index": output_index,
            "context_lens": context_lens,
            "kernel_rows": kernel_rows,
            "kernel_tables": kernel_tables,
        },
        mask,
        query_chunks,
        parts,
        device,
        [chunks[k].request_id for k in sampling],
        wide,
    )

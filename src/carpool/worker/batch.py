"""Build one step's ragged batch: flat tokens with positions, sequence ids and cache slots.

Like llama.cpp's ``llama_batch``, every token carries its position and its sequence; unlike a
padded rectangle, no compute is spent on padding tokens in the matmuls. Only the attention
needs a ``[B, Q, L]`` view, whose index tensors are built here once for all layers.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from carpool.model import row_paths
from carpool.model.attention import AttentionMetadata
from carpool.model.row_paths import WideRows


class ChunkLike(Protocol):
    """What the batch builder needs of a scheduled chunk (``ScheduledChunk`` has it)."""

    request_id: str
    token_ids: list[int]
    start_pos: int
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


def generated_row(chunk: ChunkLike, prompt_len: int) -> bool:
    """Whether ``chunk`` is one token at a generated position (past its request's
    ``prompt_len`` prompt tokens): a row of a pure decode step."""
    return len(chunk.token_ids) == 1 and chunk.start_pos >= prompt_len


def build_ragged_batch(
    chunks: Sequence[ChunkLike],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    generated_from: Sequence[int] | None = None,
    reuse: DecodeInputs | None = None,
    kernel_below: int = 0,
    wide_from: int | None = None,
) -> ModelInput:
    """Pack ``chunks`` end to end into one ``ModelInput``.

    Args:
        chunks: per sequence, the tokens to compute now and their start position.
        block_tables: per chunk, its request's block table, covering
            ``start_pos + len(token_ids)`` slots.
        block_size: tokens per KV block.
        device: where the tensors go.
        generated_from: per chunk, its request's prompt length: tokens at or after it (the
            generated ones, in decode or in a recompute after a preemption) are *kernel rows*
            (``AttentionMetadata.context_lens``), the prompt's take the gathered path (but
            for those below ``kernel_below``). The rule depends on the row alone, so a
            sequence's numbers do not change with its batch (the two paths round
            differently). None: every row of a pure decode step.
        reuse: a pure decode step's inputs kept from the step before (``DecodeInputs``, CPU
            only): patched in place when the same sequences decode again; any other step
            forgets them. None: new tensors every step.
        kernel_below: prompt rows at positions below this are kernel rows too
            (``paged_attention.prompt_kernel_positions``: where the kernel computes a short
            context's rows faster than the rectangle's SDPA calls); 0: none. A function of the
            row's position alone, as the rule above.
        wide_from: prompt rows (not generated ones) at positions from this on take the
            quantized linears' widened weight (``AttentionMetadata.wide_rows``;
            ``quant.wide_prompt_from``); None: none. Again the row's own property.
    """
    assert chunks, "a batch needs at least one chunk"
    if (
        all(len(c.token_ids) == 1 for c in chunks)
        if generated_from is None
        else all(generated_row(c, g) for c, g in zip(chunks, generated_from, strict=True))
    ):
        if reuse is not None:
            return reuse.build(chunks, block_tables, block_size)
        return _decode_batch(chunks, block_tables, block_size, device)[0]
    if reuse is not None:
        reuse.forget()
    return _ragged_batch(
        chunks, block_tables, block_size, device, generated_from, kernel_below, wide_from
    )


def _ragged_batch(
    chunks: Sequence[ChunkLike],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str,
    generated_from: Sequence[int] | None,
    kernel_below: int = 0,
    wide_from: int | None = None,
) -> ModelInput:
    """``build_ragged_batch`` of any step."""
    # Index arithmetic in numpy: dozens of tiny torch ops would cost more than the step's
    # matmuls at batch 1.
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
    assert q_lens.min() > 0, f"empty chunk in batch: {q_lens.tolist()}"
    starts = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=len(chunks))
    b, q = len(chunks), int(q_lens.max())
    ctx = starts + q_lens
    max_blocks = -(-int(ctx.max()) // block_size)
    tables = np.zeros((b, max_blocks), dtype=np.int64)
    for k, (c, table) in enumerate(zip(chunks, block_tables, strict=True)):
        n = min(len(table), max_blocks)
        assert len(table) * block_size >= ctx[k], (
            f"request {c.request_id}: block table of {len(table)} blocks "
            f"cannot hold {ctx[k]} tokens"
        )
        tables[k, :n] = table[:n]
    input_ids = np.fromiter(
        (t for c in chunks for t in c.token_ids), dtype=np.int64, count=int(q_lens.sum())
    )
    offsets = np.concatenate(([0], np.cumsum(q_lens)))  # cumulative lengths [B + 1]
    seq_index = np.repeat(np.arange(b), q_lens)  # [T]
    local = np.arange(len(input_ids)) - offsets[seq_index]  # index within its chunk
    positions = starts[seq_index] + local  # [T]

    # Flat cache slot of each new token: its block (through the table) and offset.
    slot_mapping = tables[seq_index, positions // block_size] * block_size + positions % block_size

    query_index = output_index = context_lens = kernel_rows = kernel_tables = None
    query_chunks = None
    rect_tables = tables
    # Each chunk's rows that are not kernel rows: positions [lo, hi), one contiguous run (the
    # kernel's rows are a prompt's first kernel_below positions and the generated tokens).
    lo = np.maximum(starts, kernel_below)
    if generated_from is None:
        hi = ctx if q > 1 else starts  # a step of one-token chunks: every row a kernel row
    else:
        hi = np.minimum(ctx, np.fromiter(generated_from, dtype=np.int64, count=len(chunks)))
    rect_lens = np.maximum(hi - lo, 0)
    is_kernel_row = (positions < lo[seq_index]) | (positions >= hi[seq_index])
    # A prompt's rows (below hi) from wide_from on: the quantized linears' widened weight.
    wide = None
    if wide_from is not None:
        wide = row_paths.from_mask((positions >= wide_from) & (positions < hi[seq_index]))
    # Rectangles over groups of the chunks' other rows (rectangle_parts), the kernel rows in
    # none: a decode sequence's or a short context's prompt rows padded to the longest chunk's
    # tiles only wasted compute (a 512-token prompt beside 3 decoding sequences paid for
    # 4 x 512 query rows: small's mixed steps 1.1-1.5x a prompt's step alone).
    parts: list[tuple[np.ndarray, Rectangle]] | None = rectangle_parts(
        offsets[:-1], lo, rect_lens, starts, tables, block_size
    )
    mask = None  # a pure decode step's: made from context_lens if needed (AttentionMetadata)
    if not parts:
        # Every row through the kernel, in a pure decode step's form: one row per sequence (a
        # short prompt's rows each its own, with its own context; the decode stack's up to its
        # plan's rows, see carpool.model.decode_stack).
        context_lens = positions + 1
        rect_tables = tables[seq_index]
        parts = None
    elif len(parts) == 1 and len(parts[0][0]) == len(input_ids):  # one over every row
        mask, query_index, output_index, rect_tables, query_chunks = parts[0][1]
        parts = None
    elif is_kernel_row.any():
        kernel_rows = np.flatnonzero(is_kernel_row)
        context_lens = positions[kernel_rows] + 1
        kernel_tables = tables[seq_index[kernel_rows]]
    sampling = [k for k, c in enumerate(chunks) if c.needs_sample]
    logits_indices = offsets[1:][sampling] - 1

    return step_input(
        {
            "input_ids": input_ids,
            "positions": positions,
            "slot_mapping": slot_mapping,
            "block_tables": rect_tables,
            "query_index": query_index,
            "output_index": output_index,
            "context_lens": context_lens,
            "kernel_rows": kernel_rows,
            "kernel_tables": kernel_tables,
            "logits_indices": logits_indices,
        },
        mask,
        query_chunks,
        parts,
        device,
        [chunks[k].request_id for k in sampling],
        wide,
    )


def step_input(
    host: dict[str, np.ndarray | None],
    mask: np.ndarray | None,
    query_chunks: tuple[tuple[int, int, int], ...] | None,
    parts: list[tuple[np.ndarray, Rectangle]] | None,
    device: torch.device | str,
    sample_request_ids: list[str],
    wide_rows: WideRows | None = None,
) -> ModelInput:
    """A step's ``ModelInput``: its index arrays on ``device`` and its ``AttentionMetadata``
    (both layouts' tail); ``sample_request_ids``: the requests of ``logits_indices``' rows.

    ``host``: ``input_ids`` (one per computed row, pads included), ``positions``,
    ``slot_mapping``, ``block_tables``, ``query_index``, ``output_index``, ``context_lens``,
    ``kernel_rows``, ``kernel_tables``, ``logits_indices`` (None where absent); ``mask`` and
    ``query_chunks``: one rectangle over every row (``parts`` None), or ``parts``: a rectangle
    each over some rows (``attention_rectangle``), the outer mask then None; ``wide_rows``: the
    rows that take the widened quantized weight (``AttentionMetadata``). The index tensors,
    the parts' included, travel in one packed copy, the masks in another."""
    tensors = {k: int64_tensor(a) for k, a in host.items()}
    for i, (rows, (_, p_query, p_output, p_tables, _)) in enumerate(parts or []):
        tensors |= {
            f"{i}.rows": int64_tensor(rows),
            f"{i}.tables": int64_tensor(p_tables),
            f"{i}.query_index": int64_tensor(p_query),
            f"{i}.output_index": int64_tensor(p_output),
        }
    v = to_device(tensors, device)
    masks = masks_to_device([mask] if parts is None else [rect[0] for _, rect in parts], device)
    meta = AttentionMetadata(
        slot_mapping=v["slot_mapping"],
        block_tables=v["block_tables"],
        attn_mask=masks[0] if parts is None else None,
        query_index=v["query_index"],
        output_index=v["output_index"],
        context_lens=v["context_lens"],
        kernel_rows=v["kernel_rows"],
        kernel_tables=v["kernel_tables"],
        query_chunks=query_chunks,
        wide_rows=wide_rows,
        parts=None
        if parts is None
        else [
            AttentionMetadata(
                slot_mapping=v["slot_mapping"],
                block_tables=v[f"{i}.tables"],
                attn_mask=part_mask,
                query_index=v[f"{i}.query_index"],
                output_index=v[f"{i}.output_index"],
                gathered_rows=v[f"{i}.rows"],
                query_chunks=rect[4],
            )
            for i, (part_mask, (_, rect)) in enumerate(zip(masks, parts, strict=True))
        ],
    )
    return ModelInput(
        input_ids=v["input_ids"],
        positions=v["positions"],
        meta=meta,
        logits_indices=v["logits_indices"],
        sample_request_ids=sample_request_ids,
        num_tokens=len(host["input_ids"]),
    )


def int64_tensor(a: np.ndarray | None) -> torch.Tensor | None:
    """A host int64 tensor of ``a`` (None stays None)."""
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


# (attn_mask, query_index, output_index, block_tables, query_chunks) of one attention
# rectangle (``attention_rectangle``).
Rectangle = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[tuple[int, int, int], ...]]

# What splitting a step's prompt chunks into several attention rectangles costs, in (query row,
# key) pairs of SDPA work: each more SDPA call (its dispatch, the tile's slices and the copy of
# its output) and each more rectangle (a gather of its blocks, its query rows and mask, the
# scatter of its output). Torch's CPU SDPA costs about the same per (sequence, head, row, key)
# whatever the batch it is called with (measured on the Zen 4: [B, 8, 32, D=64] calls over
# 32-2,048 keys, B = 1, 2, 4: 27 ns a pair, B x 55-65 us at 32 keys, ~12 us a call beside it),
# so a rectangle's padding tiles cost what real ones do and another call little.
EXTRA_CALL_PAIRS = 1024
EXTRA_RECTANGLE_PAIRS = 2048


def _rectangle_cost(first: int, last: int, sequences: int) -> int:
    """Pairs of one rectangle over tiles ``first..last`` of ``sequences`` sequences, its calls'
    and its own overhead included (see ``attention_rectangle``: tile j's call covers keys
    ``[0, T (j + 1))`` for every sequence)."""
    t = PREFILL_TILE_ROWS
    tiles = (last + 1) * (last + 2) // 2 - first * (first + 1) // 2  # sum of j + 1
    return sequences * t * t * tiles + (last - first + 1) * EXTRA_CALL_PAIRS + EXTRA_RECTANGLE_PAIRS


def rectangle_groups(q_lens: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Which prompt chunks (their query lengths and first positions) share an attention
    rectangle: groups of chunk indices, each in order, the groups in the order of their first
    chunks; one group (every chunk) where one rectangle costs least.

    A rectangle computes every tile it spans for every sequence in it (``attention_rectangle``),
    so chunks over other positions pay for each other's tiles: a long prompt's 2-token tail at
    position 510 beside the next prompt's first 507 tokens (what a batch of 512-token prompts
    chunked into 512-token steps gives) computed both prompts' 16 tiles, 2.6x the attention of
    the two apart. Chunks over the same tiles share one at no padding cost; groups are then
    merged, the cheapest first, while a merge saves more calls and rectangles
    (``EXTRA_CALL_PAIRS``, ``EXTRA_RECTANGLE_PAIRS``) than it pads. A row's bits do not depend
    on the rectangle it is computed in (each call's shape follows from its tile's positions)."""
    t = PREFILL_TILE_ROWS
    firsts = starts // t
    lasts = (starts + q_lens - 1) // t
    spans: dict[tuple[int, int], list[int]] = {}
    for k, span in enumerate(zip(firsts.tolist(), lasts.tolist(), strict=True)):
        spans.setdefault(span, []).append(k)
    groups = [(f, l, ks) for (f, l), ks in spans.items()]
    while len(groups) > 1:
        best: tuple[int, int, int] | None = None  # (saving, i, j)
        for i, j in itertools.combinations(range(len(groups)), 2):
            (fi, li, ki), (fj, lj, kj) = groups[i], groups[j]
            merged = _rectangle_cost(min(fi, fj), max(li, lj), len(ki) + len(kj))
            saving = _rectangle_cost(fi, li, len(ki)) + _rectangle_cost(fj, lj, len(kj)) - merged
            if saving > 0 and (best is None or saving > best[0]):
                best = (saving, i, j)
        if best is None:
            break
        _, i, j = best
        (fi, li, ki), (fj, lj, kj) = groups[i], groups[j]
        groups[i] = (min(fi, fj), max(li, lj), sorted(ki + kj))
        del groups[j]
    return sorted((np.asarray(ks, dtype=np.int64) for _, _, ks in groups), key=lambda g: g[0])


def rectangle_parts(
    first_rows: np.ndarray,
    lo: np.ndarray,
    lens: np.ndarray,
    starts: np.ndarray,
    tables: np.ndarray,
    block_size: int,
) -> list[tuple[np.ndarray, Rectangle]]:
    """The attention rectangles of a step's runs of rows (one run a chunk or padded row, its
    first step row ``first_rows[k]`` at position ``starts[k]``): the ``lens[k]`` rows from
    position ``lo[k]`` of each run, grouped by ``rectangle_groups``; ``(step rows,
    attention_rectangle)`` per group, none for runs of no rows (every row a kernel row)."""
    live = np.flatnonzero(lens > 0)
    if not len(live):
        return []
    return [
        (
            np.concatenate([first_rows[k] + lo[k] - starts[k] + np.arange(lens[k]) for k in g]),
            attention_rectangle(lens[g], lo[g], tables[g], block_size),
        )
        for g in (live[g] for g in rectangle_groups(lens[live], lo[live]))
    ]


def masks_to_device(
    masks: list[np.ndarray | None], device: torch.device | str
) -> list[torch.Tensor | None]:
    """Boolean masks on ``device``, in one copy off the CPU (as ``to_device`` packs the index
    tensors: a step with prompt chunks makes two transfers however many rectangles it has)."""
    host = [None if m is None else torch.from_numpy(m) for m in masks]
    present = [m for m in host if m is not None]
    if torch.device(device).type == "cpu" or len(present) <= 1:
        return [None if m is None else m.to(device) for m in host]
    views = iter(
        torch.cat([m.reshape(-1) for m in present]).to(device).split([m.numel() for m in present])
    )
    return [None if m is None else next(views).view(m.shape) for m in host]


# A prompt chunk's attention runs in SDPA calls of PREFILL_TILE_ROWS rows at fixed positions
# (tiles): rows of positions [T * j, T * (j + 1)) of every sequence of a rectangle, over keys
# [0, T * (j + 1)), under a mask that depends on the positions alone (key k seen by position p
# iff k <= p). Why: torch's CPU SDPA rounds a row's sums differently in calls of other row or
# key counts (its blocking follows the call's shape), so a prompt cut into chunks at other
# places (the token budget shared with other requests, a preemption's recompute) computed
# other bits; through the bf16-rounded inputs of the quantized kernels the default SmolLM2
# model's logprobs moved by up to ~0.04 and greedy tokens differed between batching
# strategies. In a call of a given shape and mask a row's bits do not depend on the rows or
# sequences beside it, nor on the values of its padding rows (tested), so a prompt's rows now
# compute the same bits however it is chunked and batched. Each call also stops at its tile's
# keys, so the causal square's upper half is not computed (what 128-row chunks of long prompts
# did before: 1.16-1.65x on SmolLM2's attention at 512-2,048 rows, twenty-eighth pass).
# 32 rows: a short prompt computes at most a 32 x 32 square, a 512-token one 16 calls a layer.
PREFILL_TILE_ROWS = 32


def _tiles(q_lens: np.ndarray, starts: np.ndarray) -> tuple[int, int]:
    """The first and last tile (``PREFILL_TILE_ROWS`` positions each) these chunks' rows lie in."""
    t = PREFILL_TILE_ROWS
    return int(starts.min()) // t, (int((starts + q_lens).max()) - 1) // t


def attention_rectangle(
    q_lens: np.ndarray, starts: np.ndarray, tables: np.ndarray, block_size: int
) -> Rectangle:
    """The attention rectangle of some prompt chunks (their query lengths, first positions and
    block tables, in step order), in whole tiles: row ``r`` of every sequence is position
    ``base + r``, ``base`` the first tile's first position; the rows of a sequence's tiles
    outside its chunk are padding (their query one of its rows, their output never read).
    ``(attn_mask [1, 1, Q, L], query_index [B, Q], output_index [rows], block_tables
    [B, L / block_size], calls)`` as ``AttentionMetadata`` holds them, the flat indices counted
    over these sequences' rows alone; one SDPA call per tile (``query_chunks``)."""
    t = PREFILL_TILE_ROWS
    first, last = _tiles(q_lens, starts)
    base, end = first * t, (last + 1) * t
    q = end - base
    max_blocks = -(-end // block_size)
    l = max_blocks * block_size  # keys are gathered block by block
    b = len(q_lens)
    rect_tables = np.zeros((b, max_blocks), dtype=np.int64)  # past a table: any block, masked
    n = min(tables.shape[1], max_blocks)
    rect_tables[:, :n] = tables[:, :n]
    offsets = np.concatenate(([0], np.cumsum(q_lens)))
    seq_index = np.repeat(np.arange(b), q_lens)
    local = np.arange(int(offsets[-1])) - offsets[seq_index]
    output_index = seq_index * q + starts[seq_index] + local - base
    i = np.arange(q)
    inside = np.clip(base + i[None, :] - starts[:, None], 0, q_lens[:, None] - 1)
    query_index = offsets[:-1, None] + inside
    mask = (np.arange(l)[None, :] <= (base + i)[:, None])[None, None]
    calls = tuple((p - base, p - base + t, p + t) for p in range(base, end, t))
    return mask, query_index, output_index, rect_tables, calls


def to_device(
    parts: dict[str, torch.Tensor | None], device: torch.device | str, pack: bool | None = None
) -> dict[str, torch.Tensor | None]:
    """Host int64 tensors on ``device``: off the CPU in one copy (concatenated, copied, then
    split into views of their shapes), since each host-to-device copy of a few bytes costs a
    transfer of its own on a GPU (the general path's ten index tensors were ten a step).
    ``pack``: force the packing either way (None: off the CPU only; on the CPU the tensors
    stay as they are). None entries stay None."""
    if pack is None:
        pack = torch.device(device).type != "cpu"
    present = {k: x for k, x in parts.items() if x is not None}
    if not pack or not present:
        return {k: None if x is None else x.to(device) for k, x in parts.items()}
    assert all(x.dtype == torch.int64 for x in present.values()), "int64 tensors only"
    flat = torch.cat([x.reshape(-1) for x in present.values()]).to(device)
    views = flat.split([x.numel() for x in present.values()])
    out: dict[str, torch.Tensor | None] = dict.fromkeys(parts)
    for (k, x), view in zip(present.items(), views, strict=True):
        out[k] = view.view(x.shape)
    return out


def _decode_batch(
    chunks: Sequence[ChunkLike],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str,
) -> tuple[ModelInput, array.array]:
    """``build_ragged_batch`` of a pure decode step (one generated token per sequence, every
    row a kernel row): the same tensors, as views of one tensor made from a plain list; and
    that list as the array the tensor lies on (on the CPU; ``DecodeInputs`` patches it).

    Why a path of its own: the step's Python runs right after the forward has streamed the
    weights through the caches, so each of the general path's ~30 numpy calls misses to memory;
    on a Zen 4 it took 0.34 ms of a 4 ms batch-1 step of the small model in the engine (46 us
    with warm caches).
    """
    b = len(chunks)
    positions = [c.start_pos for c in chunks]
    max_blocks = -(-(max(positions) + 1) // block_size)
    rows: list[list[int]] = []
    slots: list[int] = []
    for c, table in zip(chunks, block_tables, strict=True):
        row = list(table[:max_blocks])
        rows.append(row + [0] * (max_blocks - len(row)))
        slots.append(_decode_slot(c, table, block_size))
    # One tensor for every index list (each conversion is a pass through cold code), then
    # views of it: tokens, positions, context lengths, slots, sampled rows, block tables.
    ids = [c.token_ids[0] for c in chunks]
    sampling = [k for k, c in enumerate(chunks) if c.needs_sample]
    n = len(sampling)
    values = [*ids, *positions, *(p + 1 for p in positions), *slots, *sampling]
    values.extend(itertools.chain.from_iterable(rows))
    # Through an array (a C loop over the list) into a tensor on its memory: torch.tensor
    # of the list took ~3x as long (it inspects every element).
    buf = array.array("q", values)
    flat = torch.frombuffer(buf, dtype=torch.int64).to(device)
    # (split_with_sizes: Tensor.split's Python wrapper is one more call through cold code.)
    ids_t, pos, ctx, slots_t, sample_t, tables_t = flat.split_with_sizes(
        [b, b, b, b, n, b * max_blocks]
    )
    # No attention mask: the paged kernel needs none, and the gather path makes it from the
    # context lengths if it runs (AttentionMetadata.attn_mask).
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        block_tables=tables_t.view(b, max_blocks),
        attn_mask=None,
        context_lens=ctx,
    )
    inp = ModelInput(
        input_ids=ids_t,
        positions=pos,
        meta=meta,
        logits_indices=sample_t,
        sample_request_ids=[chunks[k].request_id for k in sampling],
        num_tokens=b,
    )
    return inp, buf


class DecodeInputs:
    """A pure decode step's ``ModelInput`` kept for the next step and patched in place (CPU).

    In steady decoding the same sequences step again, each one token further: their token
    ids, positions, context lengths and slots change, the tensors' shapes do not. The
    tensors are views of one array (``_decode_batch``), so the next step writes its values
    into that array and hands the same ``ModelInput`` out again, instead of building lists, an
    array, a tensor, six views and two dataclasses, each a call through code the weights'
    stream has just pushed out of the caches. A step of other sequences, other sampling rows,
    or a table past the kept width builds anew; so does any step after one that was not a
    pure decode step (``forget``: a preempted sequence may come back with other blocks).
    A running sequence's block table only grows, so a row is rewritten only when its length
    changed. The same values as ``_decode_batch`` (tested).

    The inputs are valid until the next ``build``: the model reads them within its step.
    """

    def __init__(self) -> None:
        # The last step's inputs and the array their tensors lie on (None: build anew).
        self._kept: tuple[ModelInput, array.array] | None = None
        self._key: tuple[tuple[str, bool], ...] = ()
        self._width = 0  # the block tables' kept width (max_blocks)
        self._lens: list[int] = []  # each row's table length when last written

    def forget(self) -> None:
        """Build the next decode step's inputs anew."""
        self._kept = None

    def build(
        self, chunks: Sequence[ChunkLike], block_tables: Sequence[Sequence[int]], block_size: int
    ) -> ModelInput:
        """``build_ragged_batch`` of a pure decode step, reusing the last one's tensors."""
        key = tuple((c.request_id, c.needs_sample) for c in chunks)
        width = -(-(max(c.start_pos for c in chunks) + 1) // block_size)
        if self._kept is None or key != self._key or width > self._width:
            self._kept = _decode_batch(chunks, block_tables, block_size, "cpu")
            self._key, self._width = key, width
            self._lens = [min(len(t), width) for t in block_tables]
            return self._kept[0]
        inp, buf = self._kept
        b, w = len(chunks), self._width
        tables_at = 4 * b + len(inp.sample_request_ids)  # ids, positions, lengths, slots, rows
        for k, (c, table) in enumerate(zip(chunks, block_tables, strict=True)):
            p = c.start_pos
            buf[k] = c.token_ids[0]
            buf[b + k] = p
            buf[2 * b + k] = p + 1
            buf[3 * b + k] = _decode_slot(c, table, block_size)
            n = min(len(table), w)
            if n != self._lens[k]:
                start = tables_at + k * w
                buf[start : start + n] = array.array("q", table[:n])
                self._lens[k] = n
        return inp


def _decode_slot(chunk: ChunkLike, table: Sequence[int], block_size: int) -> int:
    """The cache slot of a decode chunk's token (at ``chunk.start_pos``) in its ``table``."""
    p = chunk.start_pos
    assert len(table) * block_size > p, (
        f"request {chunk.request_id}: block table of {len(table)} blocks cannot hold {p + 1} tokens"
    )
    return table[p // block_size] * block_size + p % block_size

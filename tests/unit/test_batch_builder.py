"""The ragged batch builder: its pure-decode path builds what its general path builds; the
row chunks of a long prompt chunk's attention rectangle."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from carpool.worker import batch


@dataclass
class Chunk:
    request_id: str
    token_ids: list[int]
    start_pos: int
    needs_sample: bool = True


def _same(a, b) -> None:
    assert a.num_tokens == b.num_tokens and a.sample_request_ids == b.sample_request_ids
    for name in ("input_ids", "positions", "logits_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("slot_mapping", "block_tables", "attn_mask", "query_index", "output_index"):
        x, y = getattr(a.meta, name), getattr(b.meta, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    for name in ("context_lens", "kernel_rows", "kernel_tables"):
        x, y = getattr(a.meta, name), getattr(b.meta, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("seed", range(8))
def test_decode_path_equals_the_general_path(seed):
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    chunks, tables, prompts = [], [], []
    for k in range(rng.randint(1, 9)):
        pos = rng.randint(0, 70)
        blocks = -(-(pos + 1) // block_size) + rng.randint(0, 2)  # tables may run longer
        tables.append(rng.sample(range(200), blocks))
        chunks.append(Chunk(f"r{k}", [rng.randint(0, 999)], pos, rng.random() < 0.8))
        prompts.append(rng.randint(0, pos))  # the token is a generated one
    fast = batch.build_ragged_batch(chunks, tables, block_size, "cpu", prompts)
    general = batch._ragged_batch(chunks, tables, block_size, "cpu", prompts)
    _same(fast, general)
    assert fast.meta.kernel_rows is None and fast.meta.context_lens is not None
    _same(batch.build_ragged_batch(chunks, tables, block_size), general)  # generated_from None


@pytest.mark.parametrize("seed", range(6))
def test_kept_decode_inputs_equal_new_ones_step_after_step(seed):
    """DecodeInputs patches the last step's tensors: every step's inputs equal the general
    path's, through sequences decoding across block boundaries, joining, leaving, a step that
    samples fewer rows, and one recomputed into other blocks by a prefill step in between
    (which forgets the kept inputs: the decode steps around it are alike)."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    free = list(range(1000))
    rng.shuffle(free)
    seqs: dict[str, tuple[int, list[int]]] = {}  # id -> (next position, block table)

    def admit(rid: str) -> None:
        pos = rng.randint(0, 40)
        seqs[rid] = (pos, [free.pop() for _ in range(-(-(pos + 1) // block_size))])

    for k in range(rng.randint(1, 5)):
        admit(f"r{k}")
    reuse = batch.DecodeInputs()
    kept = rebuilt = 0
    for step in range(120):
        event = rng.random()
        if event < 0.04 and len(seqs) > 1:
            seqs.pop(rng.choice(sorted(seqs)))  # a sequence finished
        elif event < 0.08:
            admit(f"s{step}")  # a sequence joins
        elif event < 0.10:  # preempted, recomputed into other blocks: a prefill step
            rid = rng.choice(sorted(seqs))
            pos, table = seqs[rid]
            table[:] = [free.pop() for _ in table]
            prompt = [Chunk(rid, list(range(pos)), 0)] if pos else [Chunk(rid, [1], 0)]
            inp = batch.build_ragged_batch(prompt, [table], block_size, "cpu", [pos + 1], reuse)
            assert inp.meta.context_lens is None  # prompt rows, not a decode step
        ids = sorted(seqs)
        for rid in ids:  # the table holds this step's token
            pos, table = seqs[rid]
            while len(table) * block_size <= pos:
                table.append(free.pop())
        chunks = [
            Chunk(rid, [rng.randint(0, 999)], seqs[rid][0], event < 0.95 or i > 0)
            for i, rid in enumerate(ids)
        ]
        tables = [list(seqs[rid][1]) for rid in ids]
        prompts = [0] * len(ids)
        before = reuse._kept[0] if reuse._kept is not None else None
        got = batch.build_ragged_batch(chunks, tables, block_size, "cpu", prompts, reuse)
        _same(got, batch._ragged_batch(chunks, tables, block_size, "cpu", prompts))
        kept += got is before
        rebuilt += got is not before
        for rid in ids:
            pos, table = seqs[rid]
            seqs[rid] = (pos + 1, table)
    assert kept > 50 and rebuilt > 1, (kept, rebuilt)


def test_prompt_tokens_and_longer_chunks_take_the_general_path(monkeypatch):
    def refuse(*args):
        raise AssertionError("not a pure decode step")

    monkeypatch.setattr(batch, "_decode_batch", refuse)
    one = [Chunk("a", [5], 3)]
    # The token at position 3 is a prompt token (the prompt is 4 long): not a kernel row.
    inp = batch.build_ragged_batch(one, [[7]], 16, "cpu", [4])
    assert inp.meta.context_lens is None
    inp = batch.build_ragged_batch([Chunk("a", [5, 6], 3)], [[7]], 16, "cpu", [2])
    assert inp.num_tokens == 2


def test_decode_path_checks_the_block_table():
    with pytest.raises(AssertionError, match="cannot hold 17 tokens"):
        batch.build_ragged_batch([Chunk("a", [5], 16)], [[7]], 16, "cpu")


def test_prompt_rows_attend_in_tiles_at_fixed_positions():
    t = batch.PREFILL_TILE_ROWS
    assert t == 32
    fresh = batch.build_ragged_batch([Chunk("a", [1] * 100, 0)], [list(range(7))], 16).meta
    assert fresh.query_chunks == ((0, 32, 32), (32, 64, 64), (64, 96, 96), (96, 128, 128))
    assert tuple(fresh.attn_mask.shape) == (1, 1, 128, 128)
    assert fresh.output_index.tolist() == list(range(100))
    assert fresh.query_index[0, 100:].tolist() == [99] * 28  # padding rows: a row of its own
    # A chunk after 100 cached tokens: its tiles start at position 96, keys to each tile's end.
    later = batch.build_ragged_batch([Chunk("a", [1] * 50, 100)], [list(range(10))], 16).meta
    assert later.query_chunks == ((0, 32, 128), (32, 64, 160))
    assert later.output_index.tolist() == list(range(4, 54))
    assert later.query_index[0, :6].tolist() == [0, 0, 0, 0, 0, 1]
    assert later.block_tables.tolist() == [list(range(10))]


@pytest.mark.parametrize("seed", range(6))
def test_a_rows_attention_call_depends_on_its_position_alone(seed):
    # The same prompt cut into chunks at random places, beside other prompts: every row's SDPA
    # call has the same shape, the row the same place in it and the same mask row, so it
    # computes the same bits however the prompt is chunked and batched.
    rng = random.Random(seed)
    n = rng.randint(40, 400)
    table = list(range(-(-n // 16)))

    def calls_of_each_row(cuts: list[int]) -> dict[int, tuple]:
        seen = {}
        for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
            others = [Chunk("o", [2] * rng.randint(1, 90), rng.choice([0, 64]))]
            chunks = [*others, Chunk("p", [1] * (hi - lo), lo)][:: rng.choice([1, -1])]
            tables = [table if c.request_id == "p" else list(range(50, 60)) for c in chunks]
            meta = batch.build_ragged_batch(chunks, tables, 16).meta
            parts = meta.parts or [meta]
            for part in parts:
                rows = part.gathered_rows
                rows = range(len(meta.slot_mapping)) if rows is None else rows.tolist()
                q = part.attn_mask.shape[2]
                for k, flat in enumerate(rows):
                    pos = chunks_pos(chunks, flat)
                    if pos is None:
                        continue
                    r = int(part.output_index[k]) % q
                    (call,) = [c for c in part.query_chunks if c[0] <= r < c[1]]
                    mask_row = part.attn_mask[0, 0, r, : call[2]]
                    seen[pos] = (call[1] - call[0], call[2], r - call[0], mask_row.tolist())
        return seen

    def chunks_pos(chunks, flat):
        for c in chunks:
            if flat < len(c.token_ids):
                return c.start_pos + flat if c.request_id == "p" else None
            flat -= len(c.token_ids)
        raise AssertionError(flat)

    whole = calls_of_each_row([])
    assert sorted(whole) == list(range(n))
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, 4)))
        assert calls_of_each_row(cuts) == whole, cuts


@pytest.mark.parametrize("seed", range(6))
def test_tile_calls_hold_every_key_their_rows_see(seed):
    # Every key a row of a call may attend to lies inside the call's keys, for rectangles of
    # prompt chunks with different lengths and cached prefixes; the calls cover the rows once.
    rng = random.Random(seed)
    block_size = 16
    chunks, tables = [], []
    for k in range(rng.randint(1, 4)):
        start, n = rng.choice([0, rng.randint(0, 300)]), rng.randint(200, 700)
        chunks.append(Chunk(f"r{k}", [1] * n, start))
        tables.append(list(range(100 * k, 100 * k + -(-(start + n) // block_size))))
    inp = batch.build_ragged_batch(chunks, tables, block_size)
    for meta in inp.meta.parts or [inp.meta]:
        rows = meta.attn_mask.shape[2]
        calls = meta.query_chunks
        assert calls[0][0] == 0 and calls[-1][1] == rows
        for (q0, q1, keys), nxt in zip(calls, [*calls[1:], None], strict=True):
            assert q1 - q0 == batch.PREFILL_TILE_ROWS
            assert nxt is None or nxt[0] == q1, "the calls cover the rows once, in order"
            assert not meta.attn_mask[..., q0:q1, keys:].any(), (q0, q1, keys)
            assert meta.attn_mask[..., q0:q1, keys - 1].any()  # the tile's last key is seen


def _groups(q_lens, starts):
    return [g.tolist() for g in batch.rectangle_groups(np.array(q_lens), np.array(starts))]


def _cost(groups, q_lens, starts):
    t = batch.PREFILL_TILE_ROWS
    total = 0
    for g in groups:
        first = min(starts[k] for k in g) // t
        last = max(starts[k] + q_lens[k] - 1 for k in g) // t
        total += batch._rectangle_cost(first, last, len(g))
    return total


def test_rectangle_groups_keep_chunks_over_other_tiles_apart():
    # 512-token prompts prefilled in 512-token steps: a prompt's 2-token tail (tile 15) beside
    # the next prompt's first 507 tokens (tiles 0-15). One rectangle computed the 16 tiles for
    # both: 2.6x the attention (small BF16's SDPA 28 -> 75 ms a step).
    assert _groups([2, 507], [510, 0]) == [[0], [1]]
    # A short chunk at a long context beside a new prompt (the case the split was made for).
    assert _groups([16, 496], [1900, 0]) == [[0], [1]]
    # Chunks over the same tiles share one at no padding cost; two tails at one tile, a new
    # prompt apart: the tails together, in step order.
    assert _groups([32, 32, 32], [0, 0, 0]) == [[0, 1, 2]]
    assert _groups([3, 500, 5], [505, 0, 490]) == [[0, 2], [1]]
    # Tiles 0-15 and 0-14: one tile of padding costs less than 15 more calls and a rectangle.
    assert _groups([512, 480], [0, 0]) == [[0, 1]]
    # New short prompts of several lengths within one tile: one rectangle.
    assert _groups([5, 17, 32, 1], [0, 0, 0, 0]) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("seed", range(6))
def test_rectangle_groups_partition_the_chunks_and_never_cost_more(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    q_lens = [rng.choice([1, 2, 7, 32, 100, 300, 512]) for _ in range(n)]
    starts = [rng.choice([0, 0, 5, 64, 510, 1900]) for _ in range(n)]
    groups = _groups(q_lens, starts)
    assert sorted(k for g in groups for k in g) == list(range(n))
    assert all(g == sorted(g) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    # What the merging gives never costs more than one rectangle or one per chunk.
    cost = _cost(groups, q_lens, starts)
    assert cost <= _cost([list(range(n))], q_lens, starts)
    assert cost <= _cost([[k] for k in range(n)], q_lens, starts)


def test_a_chunked_prompt_batch_attends_in_a_rectangle_per_prompt():
    # A step of the 512-token prompts' prefill: a decode row, a prompt's 2-token tail, the next
    # prompt's first 508 tokens. The tail and the new prompt get a rectangle each; the decode
    # row is in neither (the paged kernel's).
    tail_table, new_table = list(range(1, 33)), list(range(40, 72))
    chunks = [
        Chunk("dec", [5], 512, needs_sample=True),
        Chunk("tail", [1, 2], 510),
        Chunk("new", list(range(3, 511)), 0, needs_sample=False),
    ]
    inp = batch.build_ragged_batch(
        chunks, [list(range(80, 113)), tail_table, new_table], 16, "cpu", [512, 512, 512]
    )
    meta = inp.meta
    assert meta.attn_mask is None and len(meta.parts) == 2
    tail, new = meta.parts
    assert tail.gathered_rows.tolist() == [1, 2]
    assert new.gathered_rows.tolist() == list(range(3, 511))
    assert tail.query_chunks == ((0, 32, 512),)  # tile 15 alone
    assert len(new.query_chunks) == 16 and tuple(new.attn_mask.shape) == (1, 1, 512, 512)
    assert meta.kernel_rows.tolist() == [0]


def test_prompt_rows_below_kernel_below_are_kernel_rows():
    # kernel_below=64: a prompt chunk's rows at positions 0-63 take the paged kernel (with their
    # own context), the rest a rectangle that starts at position 64; a step whose rows are all
    # below it takes a pure decode step's form (a row each, its own table row and context).
    table = list(range(1, 9))
    inp = batch.build_ragged_batch(
        [Chunk("a", list(range(100)), 0)], [table], 16, "cpu", [100], kernel_below=64
    )
    meta = inp.meta
    assert meta.kernel_rows.tolist() == list(range(64))
    assert meta.context_lens.tolist() == list(range(1, 65))
    assert meta.kernel_tables.tolist() == [table[:7]] * 64
    (part,) = meta.parts
    assert part.gathered_rows.tolist() == list(range(64, 100))
    assert part.query_chunks == ((0, 32, 96), (32, 64, 128))  # tiles 2 and 3
    assert part.output_index.tolist() == list(range(36))
    low = batch.build_ragged_batch(
        [Chunk("a", list(range(40)), 0), Chunk("b", [7, 8], 10)],
        [table, [20]],
        16,
        "cpu",
        [40, 12],
        kernel_below=64,
    )
    assert low.meta.parts is None and low.meta.attn_mask is None
    assert low.meta.kernel_rows is None and low.meta.query_index is None
    assert low.meta.context_lens.tolist() == [*range(1, 41), 11, 12]
    assert low.meta.block_tables.tolist() == [table[:3]] * 40 + [[20, 0, 0]] * 2
    # Generated tokens in a recompute (from position 90) are kernel rows too: the rectangle
    # covers the prompt's rows 64-89 alone.
    again = batch.build_ragged_batch(
        [Chunk("a", list(range(100)), 0)], [table], 16, "cpu", [90], kernel_below=64
    )
    assert again.meta.kernel_rows.tolist() == [*range(64), *range(90, 100)]
    assert again.meta.parts[0].gathered_rows.tolist() == list(range(64, 90))
    # kernel_below=0: the chunk's rows in one rectangle, as before.
    none = batch.build_ragged_batch([Chunk("a", list(range(100)), 0)], [table], 16, "cpu", [100])
    assert none.meta.parts is None and none.meta.kernel_rows is None

"""The ragged batch builder: its pure-decode path builds what its general path builds; the
row chunks of a long prompt chunk's attention rectangle."""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def test_query_chunks_of_fresh_and_long_prompts():
    assert batch.query_chunks(255, 0, 256) is None  # under two chunks: one call
    assert batch.query_chunks(512, 0, 512) == (
        (0, 128, 128),
        (128, 256, 256),
        (256, 384, 384),
        (384, 512, 512),
    )
    # A prompt chunk after 100 cached tokens: each call's keys run to its last row's position.
    assert batch.query_chunks(300, 100, 400) == ((0, 128, 228), (128, 256, 356), (256, 300, 400))
    long = batch.query_chunks(1984, 0, 1984)
    assert long is not None and len(long) == 8 and long[0] == (0, 256, 256)


@pytest.mark.parametrize("seed", range(6))
def test_query_chunks_hold_every_key_their_rows_see(seed):
    # Every key a row of a call may attend to lies inside the call's keys, for rectangles of
    # prompt chunks with different lengths and cached prefixes (padding rows see key 0).
    rng = random.Random(seed)
    block_size = 16
    chunks, tables = [], []
    for k in range(rng.randint(1, 4)):
        start, n = rng.choice([0, rng.randint(0, 300)]), rng.randint(200, 700)
        chunks.append(Chunk(f"r{k}", [1] * n, start))
        tables.append(list(range(100 * k, 100 * k + -(-(start + n) // block_size))))
    inp = batch.build_ragged_batch(chunks, tables, block_size)
    meta = inp.meta
    assert meta.attn_mask is not None and meta.query_chunks is not None
    rows = meta.attn_mask.shape[2]
    assert meta.query_chunks[0][0] == 0 and meta.query_chunks[-1][1] == rows
    calls = meta.query_chunks
    for (q0, q1, keys), nxt in zip(calls, [*calls[1:], None], strict=True):
        assert nxt is None or nxt[0] == q1, "the calls cover the rows once, in order"
        assert not meta.attn_mask[..., q0:q1, keys:].any(), (q0, q1, keys)

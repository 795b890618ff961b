"""The ragged batch builder's pure-decode path builds what its general path builds."""

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

"""BlockManager: exact block ids, reference counts, the integrity check; KV sizing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.capacity import kv_cache_bytes, num_blocks_for_budget
from carpool.config import ModelConfig
from carpool.kv_cache import BlockManager


def test_blocks_needed() -> None:
    bm = BlockManager(8, block_size=4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_table_with_exact_ids() -> None:
    bm = BlockManager(8, block_size=4)
    assert bm.can_allocate("a", 6)
    assert bm.allocate("a", 6) == [0, 1]
    assert bm.allocate("b", 1) == [2]
    assert bm.allocate("a", 8) == []  # 8 slots still fit in 2 blocks
    assert bm.allocate("a", 9) == [3]
    assert bm.allocate("a", 2) == []  # never shrinks
    assert bm.get_block_table("a") == [0, 1, 3]
    assert bm.get_block_table("b") == [2]
    assert bm.num_table_blocks("a") == 3 and bm.num_table_blocks("unknown") == 0
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (4, 4, 0.5)
    bm.check_integrity()


def test_get_block_table_is_a_copy() -> None:
    bm = BlockManager(4, block_size=4)
    bm.allocate("a", 4)
    bm.get_block_table("a").append(99)
    assert bm.get_block_table("a") == [0]
    assert bm.get_block_table("unknown") == []


def test_can_allocate_limits_new_and_growing_tables() -> None:
    bm = BlockManager(3, block_size=4)
    assert not bm.can_allocate("a", 13)
    assert bm.can_allocate("a", 12)
    bm.allocate("a", 10)
    assert bm.can_allocate("a", 12)  # 12 slots: still 3 blocks
    assert not bm.can_allocate("a", 13)
    assert bm.allocate("a", 12) == []
    assert not bm.can_allocate("b", 1)
    with pytest.raises(AssertionError, match="needs 1 blocks, 0 free"):
        bm.allocate("a", 13)


def test_free_returns_blocks_to_the_back_of_the_free_list() -> None:
    bm = BlockManager(4, block_size=2)
    bm.allocate("a", 4)  # [0, 1]
    bm.allocate("b", 2)  # [2]
    assert bm.free("a") == [0, 1]
    assert bm.free("a") == []  # idempotent
    assert bm.allocate("c", 6) == [3, 0, 1]  # 3 was never used, so it comes first
    assert bm.num_table_blocks("a") == 0 and bm.get_block_table("c") == [3, 0, 1]
    bm.check_integrity()
    bm.free("b")
    bm.free("c")
    assert bm.num_free_blocks == 4
    bm.check_integrity()


def test_shared_blocks_are_refcounted() -> None:
    bm = BlockManager(6, block_size=2, enable_caching=True)
    tokens = [5, 6, 7, 8, 9]
    bm.allocate("a", 5)  # [0, 1, 2], two full blocks
    assert bm.cache_blocks("a", tokens, 5) == 2
    hit = bm.find_cached_prefix("b", tokens)
    assert hit == [0, 1]
    assert bm.allocate("b", 5, hit) == [3]
    assert bm.get_block_table("b") == [0, 1, 3]
    bm.check_integrity()
    assert bm.free("a") == [2]  # 0 and 1 are still held by b
    bm.check_integrity()
    assert bm.free("b") == [0, 1, 3]
    assert bm.num_free_blocks == 6
    bm.check_integrity()


def test_only_full_computed_blocks_are_cached() -> None:
    bm = BlockManager(6, block_size=2, enable_caching=True)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate("a", 3)
    assert bm.cache_blocks("a", tokens[:3], 3) == 1  # block 1 is half full: not cached
    assert bm.find_cached_prefix("b", tokens) == [0]


def test_check_integrity_catches_corruption() -> None:
    bm = BlockManager(4, block_size=2)
    bm.allocate("a", 4)
    bm._free.append(0)  # a held block also on the free list
    with pytest.raises(AssertionError, match="free block 0 has refcount 1"):
        bm.check_integrity()
    bm._free.pop()
    bm._ref_counts[1] = 2
    with pytest.raises(AssertionError, match="block 1 has refcount 2 but 1 holders"):
        bm.check_integrity()
    bm._ref_counts[1] = 1
    bm._tables["a"].pop()
    bm._num_tokens["a"] = 2
    with pytest.raises(AssertionError, match="block 1 is neither free nor held"):
        bm.check_integrity()


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (4, 0), (True, 16), (2.0, 4)])
def test_rejects_bad_sizes(num_blocks: object, block_size: object) -> None:
    with pytest.raises(ValueError, match="must be an int >= 1"):
        BlockManager(num_blocks, block_size)  # type: ignore[arg-type]


# ---- property test -----------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "append", "compute", "free", "discard"]),
        st.integers(0, 5),  # request id
        st.integers(0, 2),  # prompt family (shared prefixes make hits)
        st.integers(0, 40),  # tokens
    ),
    max_size=60,
)
# Token streams of three prompt families: 0 and 1 share their first 6 tokens.
FAMILIES = [
    [i % 7 for i in range(64)],
    [i % 7 for i in range(6)] + [50 + i for i in range(58)],
    [3] * 64,
]


@settings(max_examples=200, deadline=None)
@given(
    ops=OPS,
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 5),
    caching=st.booleans(),
)
def test_random_operations_keep_integrity(
    ops: list[tuple[str, int, int, int]], num_blocks: int, block_size: int, caching: bool
) -> None:
    """allocate (with a prefix hit) / append / compute (cache) / free (finish or preempt) /
    discard (failed step), under pressure that forces eviction: integrity after every
    operation, and at the end every block is free or cached-evictable."""
    bm = BlockManager(num_blocks, block_size, enable_caching=caching)
    family: dict[str, int] = {}  # requests holding a table -> their token family
    reserved: dict[str, int] = {}  # requests holding a table -> token slots reserved
    for op, i, fam, n in ops:
        rid = f"r{i}"
        if op == "allocate" and rid not in family:
            tokens = FAMILIES[fam][: max(n, 1)]
            hit = bm.find_cached_prefix(rid, tokens)
            assert len(hit) * block_size < len(tokens)  # the last token is always computed
            if bm.can_allocate(rid, len(tokens), hit):
                before = bm.num_free_blocks
                held_hit = sum(1 for b in hit if bm._ref_counts[b] > 0)
                new = bm.allocate(rid, len(tokens), hit)
                assert bm.num_free_blocks == before - len(new) - (len(hit) - held_hit)
                assert bm.get_block_table(rid)[: len(hit)] == hit
                assert len(bm.get_block_table(rid)) == bm.blocks_needed(len(tokens))
                family[rid], reserved[rid] = fam, len(tokens)
            else:
                need = bm.num_new_blocks(rid, len(tokens)) - len(hit)
                assert need > bm.num_free_blocks - sum(1 for b in hit if bm._ref_counts[b] == 0)
                bm.free(rid)  # drop the lookup memo
        elif op == "append" and rid in family:
            total = reserved[rid] + n % 6
            if total <= 64 and bm.can_allocate(rid, total):
                bm.allocate(rid, total)
                reserved[rid] = total
        elif op == "compute" and rid in family:
            computed = reserved[rid]
            bm.cache_blocks(rid, FAMILIES[family[rid]][:computed], computed)
        elif op in ("free", "discard"):
            bm.free(rid, discard=op == "discard")
            family.pop(rid, None)
            reserved.pop(rid, None)
        bm.check_integrity()
    for i in range(6):
        bm.free(f"r{i}")
    bm.check_integrity()
    assert bm.num_free_blocks == num_blocks and bm.num_used_blocks == 0
    assert sorted([*bm._free, *bm._cache.evictable]) == list(range(num_blocks))
    assert set(bm._cache.evictable) == set(bm._cache.hash_of)


# ---- sizing --------------------------------------------------------------------------------


def test_num_blocks_for_budget_uses_model_kv_bytes() -> None:
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    per_token = cfg.kv_bytes_per_token_for(2)  # 2 * 2 layers * 2 kv heads * 16 * 2 bytes
    assert per_token == 256
    block = 16 * per_token  # 4096 bytes
    assert num_blocks_for_budget(10 * block, per_token, 16) == 10
    assert num_blocks_for_budget(10 * block + block - 1, per_token, 16) == 10  # floor
    assert kv_cache_bytes(10, per_token, 16) == 10 * block


def test_num_blocks_for_budget_too_small() -> None:
    with pytest.raises(ValueError, match="cannot hold one block.*needs 4096 bytes"):
        num_blocks_for_budget(4095, 256, 16)


@pytest.mark.parametrize("args", [(1000, 0, 16), (1000, 16, 0), (1000.0, 16, 16), (1000, True, 16)])
def test_num_blocks_for_budget_bad_args(args: tuple) -> None:
    with pytest.raises(ValueError):
        num_blocks_for_budget(*args)

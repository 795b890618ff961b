"""Prefix caching: the chain hash, eviction order, and the continuous scheduler over a fake
paged "model" whose KV slots hold (position, token): a wrong shared block, a cached block
written in place, or a hit that skips a token the request needs changes the generated tokens.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.config import EngineConfig
from carpool.kv_cache import BlockManager, hash_block
from carpool.request import FinishReason, Request
from carpool.sampling_params import SamplingParams
from carpool.scheduling import BlockTables, ContinuousScheduler, SchedulerOutput

VOCAB = 1000


def next_token(context: list[int]) -> int:
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    ctx, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(ctx))
        ctx.append(out[-1])
    return out


class SharedKVRunner:
    """Writes each chunk's (position, token) into its slots, reads the context back from them.

    Unlike a per-request check, a slot may hold another request's entry (that is sharing), but
    a write into a slot of a *cached* block is an error: cached blocks are never written.
    """

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.bs = bm.block_size
        self.kv: list[tuple[int, int] | None] = [None] * (bm.num_blocks * bm.block_size)
        self.tables = BlockTables()  # kept from the per-step deltas, like the model runner

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        cached = set(self.bm._cache.hash_of)
        self.tables.apply(out)
        for c in out.chunks:
            assert self.tables[c.request_id] == self.bm.get_block_table(c.request_id), c
            for i, tok in enumerate(c.token_ids):
                pos = c.start_pos + i
                block = self.tables[c.request_id][pos // self.bs]
                assert block not in cached, f"{c.request_id} writes cached block {block}"
                self.kv[block * self.bs + pos % self.bs] = (pos, tok)
        sampled = {}
        for c in out.chunks:
            if not c.needs_sample:
                continue
            ctx = []
            for pos in range(c.end_pos):
                entry = self.kv[self.tables[c.request_id][pos // self.bs] * self.bs + pos % self.bs]
                assert entry is not None and entry[0] == pos, (c.request_id, pos, entry)
                ctx.append(entry[1])
            sampled[c.request_id] = next_token(ctx)
        return sampled


def make_scheduler(num_blocks: int = 64, budget: int = 32, seqs: int = 8) -> ContinuousScheduler:
    cfg = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=4)
    return ContinuousScheduler(cfg, BlockManager(num_blocks, 4, enable_caching=True), 4096)


def request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, prompt, params, arrival_time=0.0)


def run(sched: ContinuousScheduler, runner: SharedKVRunner, max_steps: int = 3000) -> list[str]:
    finished = []
    for i in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule(float(i))
        sched.block_manager.check_integrity()
        finished += [r.request_id for r in sched.update_from_output(out, runner.execute(out), i)]
        sched.block_manager.check_integrity()
    raise AssertionError("not finished")


# ---- the hash and the BlockManager -------------------------------------------------------


def test_chain_hash_depends_on_the_whole_prefix() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert len(a) == 16  # 128 bits
    assert a == hash_block(None, [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], b"lora-1") != a
    assert hash_block(None, [1, 2, 3, 4 + 2**40]) != a  # ids are not truncated


def test_last_token_is_always_computed() -> None:
    bm = BlockManager(8, 4, enable_caching=True)
    tokens = list(range(8))
    bm.allocate("a", 8)
    assert bm.cache_blocks("a", tokens, 8) == 2
    # An identical 8-token prompt may hit only block 0: block 1 holds its last token.
    assert bm.find_cached_prefix("b", tokens) == bm.get_block_table("a")[:1]
    assert bm.find_cached_prefix("c", tokens + [9]) == bm.get_block_table("a")


def test_eviction_is_lru_and_only_under_pressure() -> None:
    bm = BlockManager(4, 2, enable_caching=True)
    bm.allocate("a", 4)  # [0, 1]
    bm.cache_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")  # cached, evictable: tail block 1 first, then 0
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    assert bm.allocate("b", 4) == [2, 3]  # plain free blocks first: nothing evicted
    bm.cache_blocks("b", [9, 9, 9, 9], 4)
    bm.free("b")  # evictable order now 1, 0, 3, 2
    assert bm.prefix_cache_stats.evictions == 0
    assert bm.allocate("c", 6) == [1, 0, 3]
    assert bm.prefix_cache_stats.evictions == 3
    assert bm.find_cached_prefix("x", [1, 2, 3, 4, 5]) == []
    # b's tail block 3 was evicted before its head block 2, which still hits.
    assert bm.find_cached_prefix("y", [9, 9, 9, 9, 5]) == [2]
    bm.check_integrity()


def test_a_hit_makes_blocks_recently_used() -> None:
    bm = BlockManager(4, 2, enable_caching=True)
    for rid, toks in (("a", [1, 1, 1, 1]), ("b", [2, 2, 2, 2])):
        bm.allocate(rid, 4)
        bm.cache_blocks(rid, toks, 4)
        bm.free(rid)
    # a's blocks were released first; hitting them again makes b's the LRU ones.
    hit = bm.find_cached_prefix("a2", [1, 1, 1, 1, 7])
    bm.allocate("a2", 5, hit)
    bm.free("a2")
    assert bm.allocate("c", 2) not in ([0], [1])
    assert bm.find_cached_prefix("a3", [1, 1, 1, 1, 7]) == hit
    bm.check_integrity()


# ---- the scheduler -------------------------------------------------------------------------


def test_shared_prefix_requests_reuse_blocks_and_generate_the_same() -> None:
    sched = make_scheduler()
    runner = SharedKVRunner(sched.block_manager)
    system = list(range(100, 130))  # 30 tokens: 7 full blocks of 4
    prompts = [system + [7, i, 8] for i in range(6)]
    sched.add_request(request("first", prompts[0], 5))
    run(sched, runner)
    for i in range(1, 6):
        sched.add_request(request(f"r{i}", prompts[i], 5))
    run(sched, runner)
    stats = sched.block_manager.prefix_cache_stats
    assert stats.hits == 5 * 7 * 4  # each later request hit the 7 system blocks
    assert stats.queries == sum(len(p) for p in prompts)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(12, 40),
    budget=st.integers(4, 40),
    seqs=st.integers(1, 6),
)
def test_random_workloads_match_the_reference(
    seed: int, num_blocks: int, budget: int, seqs: int
) -> None:
    """Shared prefixes, arrivals over time, aborts, preemption under a small cache: every
    finished request generates its reference tokens, and at the end every block is free or
    cached."""
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks, budget, seqs)
    runner = SharedKVRunner(sched.block_manager)
    systems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    pending = []
    for i in range(10):
        prompt = rng.choice(systems) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))]
        pending.append(request(f"r{i}", prompt, rng.randrange(1, 12)))
    expected = {
        r.request_id: reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
        for r in pending
    }
    done, aborted = {}, set()
    for step in range(5000):
        if not pending and not sched.has_unfinished():
            break
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop(0))
        if sched.requests and rng.random() < 0.03:
            rid = rng.choice(sorted(sched.requests))
            sched.finish_request(rid, FinishReason.ABORT, float(step))
            aborted.add(rid)
        out = sched.schedule(float(step))
        sched.block_manager.check_integrity()
        for r in sched.update_from_output(out, runner.execute(out), float(step)):
            done[r.request_id] = r.output_token_ids
        sched.block_manager.check_integrity()
    for rid, toks in done.items():
        assert toks == expected[rid], rid
    assert set(done) | aborted == set(expected)
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == num_blocks
    assert set(bm._cache.evictable) == set(bm._cache.hash_of)

"""The static-family policies (sequential, static, bucketed, dynamic) with a fake model on CPU.

The fake runner writes every scheduled token into the KV slot its block table names and samples
a deterministic function of the context it reads back from those slots, so a wrong block
table, a wrong ``start_pos`` or a lost token changes the generated tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.config import EngineConfig
from carpool.errors import InvalidRequestError
from carpool.kv_cache import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.sampling_params import SamplingParams
from carpool.scheduling import (
    BlockTables,
    BucketedPolicy,
    DynamicBatchPolicy,
    SchedulerOutput,
    SchedulingPolicy,
    SequentialPolicy,
    StaticBatchPolicy,
)
from carpool.scheduling.bucketed import log_spaced_boundaries
from carpool.scheduling.factory import make_policy

VOCAB = 1000
BLOCK = 4


def make_request(rid: str, prompt_len: int, max_tokens: int, arrival: float = 0.0) -> Request:
    prompt = [(sum(map(ord, rid)) + i * 13) % VOCAB for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival)


def next_token(context: list[int]) -> int:
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def reference_output(req: Request) -> list[int]:
    ctx, out = list(req.prompt_token_ids), []
    for _ in range(req.sampling_params.max_tokens):
        out.append(next_token(ctx))
        ctx.append(out[-1])
    return out


class FakeRunner:
    """A paged "model": writes chunks to slots, samples from what the slots hold. It keeps the
    block tables from the per-step deltas, as the model runner does, checked against the
    BlockManager's."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: dict[int, tuple[str, int, int]] = {}
        self.tables = BlockTables()

    @staticmethod
    def slot(table: list[int], pos: int) -> int:
        return table[pos // BLOCK] * BLOCK + pos % BLOCK

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        self.tables.apply(out)
        for c in out.chunks:
            assert self.tables[c.request_id] == self.bm.get_block_table(c.request_id), c
            for i, tok in enumerate(c.token_ids):
                self.kv[self.slot(self.tables[c.request_id], c.start_pos + i)] = (
                    c.request_id,
                    c.start_pos + i,
                    tok,
                )
        sampled = {}
        for c in out.chunks:
            ctx = []
            for pos in range(c.end_pos):
                entry = self.kv[self.slot(self.tables[c.request_id], pos)]
                assert entry[:2] == (c.request_id, pos), f"{c.request_id}@{pos} holds {entry}"
                ctx.append(entry[2])
            sampled[c.request_id] = next_token(ctx)
        return sampled


def make(
    cls: type[StaticBatchPolicy], *, num_blocks: int = 64, max_model_len: int = 256, **kw: object
) -> StaticBatchPolicy:
    """A policy built the engine's way: EngineConfig knobs, a BlockManager, a context limit."""
    config = EngineConfig(**{"batch_size": 4, "block_size": BLOCK, **kw})  # type: ignore[arg-type]
    return cls(config, BlockManager(num_blocks, BLOCK), max_model_len)


def run(
    policy: SchedulingPolicy, now: float = 0.0
) -> tuple[list[SchedulerOutput], list[list[str]]]:
    """Step until done; returns each step's output and the ids released at each step."""
    runner = FakeRunner(policy.block_manager)  # type: ignore[attr-defined]
    outputs, released = [], []
    while policy.has_unfinished():
        out = policy.schedule(now)
        assert not out.is_empty, "stuck: unfinished requests but nothing scheduled"
        outputs.append(out)
        done = policy.update_from_output(out, runner.execute(out), now)
        done += policy.take_released(now)
        released.append([r.request_id for r in done])
        now += 1.0
    return outputs, released


# ---- static ---------------------------------------------------------------------------------


def test_static_runs_batches_and_releases_together():
    policy = make(StaticBatchPolicy, batch_size=3)
    reqs = [make_request(f"r{i}", 5 + i, n) for i, n in enumerate([2, 6, 3, 4, 1])]
    for r in reqs:
        policy.add_request(r)
    outputs, released = run(policy)
    # Batch 1 (r0, r1, r2) lasts 6 steps (its slowest); batch 2 (r3, r4) lasts 4.
    assert [o.num_seqs for o in outputs] == [3, 3, 2, 1, 1, 1, 2, 1, 1, 1]
    assert [o.num_idle_seats for o in outputs] == [0, 0, 1, 2, 2, 2, 0, 1, 1, 1]
    assert released[5] == ["r0", "r1", "r2"] and released[9] == ["r3", "r4"]
    assert all(not ids for k, ids in enumerate(released) if k not in (5, 9))
    for r in reqs:
        assert r.output_token_ids == reference_output(r)
    assert {r.finished_time for r in reqs[:3]} == {5.0}, "a static batch finishes together"
    assert reqs[0].token_times[-1] == 1.0, "r0's last token came early; only its release waited"
    policy.block_manager.check_integrity()
    assert policy.block_manager.num_free_blocks == 64


def test_static_reserves_whole_kv_up_front_and_admits_what_fits():
    # 10 blocks of 4 tokens: each request needs ceil((8 + 8 - 1) / 4) = 4 blocks -> 2 fit.
    policy = make(StaticBatchPolicy, num_blocks=10)
    for i in range(3):
        policy.add_request(make_request(f"r{i}", 8, 8))
    out = policy.schedule(0.0)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    assert out.kv_blocks_in_use == 8 and all(
        c.num_kept_blocks == 0 and len(c.new_block_ids) == 4 for c in out.chunks
    )
    assert policy.num_waiting == 1
    _, released = run(policy)
    assert sum(len(ids) for ids in released) == 3


def test_static_rejects_requests_that_can_never_fit():
    policy = make(StaticBatchPolicy, num_blocks=3)
    with pytest.raises(InvalidRequestError, match="cache has 3; static batching reserves prompt"):
        policy.add_request(make_request("big", 8, 8))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        policy.add_request(make_request("long", 250, 10))
    with pytest.raises(InvalidRequestError, match="empty"):
        policy.add_request(make_request("empty", 0, 1))
    assert not policy.has_unfinished()


def test_static_stop_string_completing_the_batch_is_released_via_take_released():
    policy = make(StaticBatchPolicy, batch_size=2)
    a, b = make_request("a", 3, 1), make_request("b", 3, 10)
    policy.add_request(a)
    policy.add_request(b)
    runner = FakeRunner(policy.block_manager)
    out = policy.schedule(0.0)
    assert policy.update_from_output(out, runner.execute(out), 0.0) == []  # a is held
    assert a.status is RequestStatus.RUNNING and not a.is_finished
    # The engine's detokenizer found a stop string in b: that completes the batch.
    assert policy.finish_request("b", FinishReason.STOP, 1.0) is b
    assert policy.take_released(1.0) == [a, b]
    assert a.finish_reason is FinishReason.LENGTH and b.finish_reason is FinishReason.STOP
    assert a.finished_time == b.finished_time == 1.0
    assert not policy.has_unfinished() and policy.block_manager.num_free_blocks == 64


def test_static_abort_is_immediate_and_leaves_an_idle_seat():
    policy = make(StaticBatchPolicy, batch_size=2)
    a, b, w = make_request("a", 3, 5), make_request("b", 3, 5), make_request("w", 3, 5)
    for r in (a, b, w):
        policy.add_request(r)
    policy.schedule(0.0)
    assert policy.abort_request("a", 0.5) is a and a.finish_reason is FinishReason.ABORT
    assert policy.abort_request("w", 0.5) is w  # waiting: finished at once too
    out = policy.schedule(1.0)
    assert [c.request_id for c in out.chunks] == ["b"] and out.num_idle_seats == 1
    assert policy.abort_request("b", 1.0) is b
    assert policy.take_released(1.0) == [] and not policy.has_unfinished()
    policy.block_manager.check_integrity()
    assert policy.block_manager.num_free_blocks == 64


# ---- sequential ----------------------------------------------------------------------------


def test_sequential_runs_one_request_at_a_time_in_order():
    policy = make(SequentialPolicy, batch_size=8)
    reqs = [make_request(f"r{i}", 4, n) for i, n in enumerate([3, 1, 2])]
    for r in reqs:
        policy.add_request(r)
    outputs, released = run(policy)
    assert [o.chunks[0].request_id for o in outputs] == ["r0"] * 3 + ["r1"] + ["r2"] * 2
    assert all(o.num_seqs == 1 and o.num_idle_seats == 0 for o in outputs)
    assert [ids for ids in released if ids] == [["r0"], ["r1"], ["r2"]]
    assert all(r.output_token_ids == reference_output(r) for r in reqs)


# ---- bucketed ------------------------------------------------------------------------------


def test_log_spaced_boundaries():
    assert log_spaced_boundaries(4, 16, 1024) == (16, 64, 256, 1024)
    assert log_spaced_boundaries(1, 16, 1024) == (1024,)


def test_bucketed_batches_similar_prompt_lengths_oldest_bucket_first():
    policy = make(BucketedPolicy, batch_size=2, num_blocks=256, bucket_boundaries=(8, 64))
    lengths = {"s0": 3, "l0": 40, "s1": 5, "l1": 50, "x0": 100, "l2": 60}
    for rid, n in lengths.items():
        policy.add_request(make_request(rid, n, 2))
    outputs, _ = run(policy)
    batches = [
        sorted(c.request_id for c in o.chunks) for o in outputs if o.chunks[0].start_pos == 0
    ]
    assert batches == [["s0", "s1"], ["l0", "l1"], ["x0"], ["l2"]]


# ---- dynamic -------------------------------------------------------------------------------


def dynamic_policy(max_wait_s: float = 0.05) -> DynamicBatchPolicy:
    policy = make(DynamicBatchPolicy, batch_size=8, num_blocks=256, max_wait_ms=max_wait_s * 1000)
    assert isinstance(policy, DynamicBatchPolicy)
    return policy


def test_dynamic_launches_when_full():
    policy = dynamic_policy()
    for i in range(7):
        policy.add_request(make_request(f"r{i}", 4, 2, arrival=0.0))
    assert policy.schedule(0.001).is_empty and policy.wake_time() == pytest.approx(0.05)
    policy.add_request(make_request("r7", 4, 2, arrival=0.002))
    out = policy.schedule(0.002)
    assert out.num_seqs == 8 and policy.wake_time() is None


def test_dynamic_lone_request_launches_at_its_deadline():
    policy = dynamic_policy()
    policy.add_request(make_request("lone", 4, 2, arrival=10.0))
    assert policy.wake_time() == pytest.approx(10.05)
    assert policy.schedule(10.0).is_empty
    assert policy.schedule(10.0499).is_empty
    out = policy.schedule(10.05)
    assert [c.request_id for c in out.chunks] == ["lone"]
    assert policy.get_request("lone").first_scheduled_time == 10.05


def test_dynamic_never_exceeds_max_batch_size():
    policy = dynamic_policy()
    for i in range(21):
        policy.add_request(make_request(f"r{i}", 3, 1 + i % 4))
    outputs, released = run(policy, now=1.0)
    assert max(o.num_seqs + o.num_idle_seats for o in outputs) == 8
    assert [len(ids) for ids in released if ids] == [8, 8, 5]


# ---- every policy --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["sequential", "static", "bucketed", "dynamic", "continuous"]),
    shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=12),
    batch_size=st.integers(1, 5),
    num_blocks=st.integers(12, 40),
)
def test_every_policy_generates_the_reference_and_frees_every_block(
    kind, shapes, batch_size, num_blocks
):
    config = EngineConfig(
        batching=kind,
        batch_size=batch_size,
        max_wait_ms=0,
        block_size=BLOCK,
        max_num_batched_tokens=32,
        max_num_seqs=4,
    )
    bm = BlockManager(num_blocks, BLOCK)
    policy = make_policy(config, bm, max_model_len=64)
    reqs = []
    for i, (p, n) in enumerate(shapes):
        req = make_request(f"r{i}", p, n)
        try:
            policy.add_request(req)
            reqs.append(req)
        except InvalidRequestError:
            assert bm.blocks_needed(p + n - 1) > num_blocks
    _, released = run(policy)
    assert sorted(i for ids in released for i in ids) == sorted(r.request_id for r in reqs)
    for r in reqs:
        assert r.output_token_ids == reference_output(r), r
    bm.check_integrity()
    assert bm.num_free_blocks == num_blocks

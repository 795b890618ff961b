"""ContinuousScheduler driven by a fake paged-KV "model" on the CPU.

The fake runner writes every scheduled token into the slot its block table names and, when a
chunk needs a sample, reads the whole context back *from those slots* and returns a
deterministic function of it. A wrong block table, a wrong ``start_pos`` or a lost
recomputation after preemption therefore changes the generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from carpool.config import EngineConfig
from carpool.errors import InvalidRequestError
from carpool.kv_cache import BlockManager
from carpool.request import FinishReason, Request, RequestStatus
from carpool.sampling_params import SamplingParams
from carpool.scheduling import BlockTables, ContinuousScheduler, SchedulerOutput

VOCAB = 1000


# ---- factories and the fake model --------------------------------------------------------


def make_request(
    rid: str, prompt_len: int, max_tokens: int, *, first: int = 1, **params: object
) -> Request:
    prompt = [(first * 7 + i * 13) % VOCAB for i in range(prompt_len)]
    params.setdefault("ignore_eos", True)
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        arrival_time=0.0,
    )


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 4096,
) -> ContinuousScheduler:
    cfg = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        enable_prefix_caching=False,
    )
    return ContinuousScheduler(cfg, BlockManager(num_blocks, block_size), max_model_len)


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def reference_output(req: Request) -> list[int]:
    """What the fake model generates for ``req`` with no batching at all."""
    ctx = list(req.prompt_token_ids)
    out = []
    for _ in range(req.sampling_params.max_tokens):
        out.append(next_token(ctx))
        ctx.append(out[-1])
    return out


class FakeRunner:
    """Writes chunks into a simulated paged KV cache and samples from what it reads back.

    Like the model runner it keeps the block tables from the per-step deltas (``BlockTables``),
    and checks them against the BlockManager's own at every step.
    """

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.block_size = bm.block_size
        self.kv: list[tuple[str, int, int] | None] = [None] * (bm.num_blocks * bm.block_size)
        self.tables = BlockTables()

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        self.tables.apply(out)
        for c in out.chunks:
            table = self.tables[c.request_id]
            assert table == self.bm.get_block_table(c.request_id), (c, table)
            assert len(table) * self.block_size >= c.end_pos, c
            for i, tok in enumerate(c.token_ids):
                self.kv[self.slot(table, c.start_pos + i)] = (
                    c.request_id,
                    c.start_pos + i,
                    tok,
                )
        for c in out.chunks:  # read after all writes, like one forward pass
            if not c.needs_sample:
                continue
            ctx = []
            for pos in range(c.end_pos):
                entry = self.kv[self.slot(self.tables[c.request_id], pos)]
                assert entry is not None and entry[:2] == (c.request_id, pos), (
                    f"KV of {c.request_id!r} at {pos} holds {entry}"
                )
                ctx.append(entry[2])
            sampled[c.request_id] = next_token(ctx)
        return sampled


@dataclass
class Trace:
    outputs: list[SchedulerOutput] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


def check_step(sched: ContinuousScheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    assert len(out.chunks) <= cfg.max_num_seqs
    assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert sched.num_running <= cfg.max_num_seqs
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    assert not set(out.preempted_ids) & {c.request_id for c in out.chunks}
    for c in out.chunks:
        req = sched.get_request(c.request_id)
        assert req is not None and req.status is RequestStatus.RUNNING
        assert c.start_pos == req.num_computed_tokens
        assert c.token_ids == req.all_token_ids[c.start_pos : c.end_pos]
        assert c.needs_sample == (c.end_pos == req.num_tokens)
    sched.block_manager.check_integrity()


def step(
    sched: ContinuousScheduler, runner: FakeRunner, now: float, trace: Trace
) -> SchedulerOutput:
    out = sched.schedule(now)
    check_step(sched, out)
    finished = sched.update_from_output(out, runner.execute(out), now)
    sched.block_manager.check_integrity()
    trace.outputs.append(out)
    trace.finished.extend(finished)
    return out


def run_to_completion(
    sched: ContinuousScheduler, runner: FakeRunner | None = None, max_steps: int = 5000
) -> Trace:
    """Step until every request has finished; the runner keeps its KV across calls."""
    runner, trace = runner or FakeRunner(sched.block_manager), Trace()
    for i in range(max_steps):
        if not sched.has_unfinished():
            return trace
        out = step(sched, runner, float(i), trace)
        assert out.chunks, f"scheduler stalled with {sched.num_waiting} waiting"
    raise AssertionError(f"not finished after {max_steps} steps")


# ---- basic flow --------------------------------------------------------------------------


def test_single_request_chunked_exact() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    req = make_request("a", 10, 3)
    sched.add_request(req)
    trace = run_to_completion(sched)
    chunks = [o.chunks[0] for o in trace.outputs]
    assert [(c.start_pos, len(c.token_ids), c.needs_sample) for c in chunks] == [
        (0, 8, False),
        (8, 2, True),
        (10, 1, True),
        (11, 1, True),
    ]
    # Block tables travel as deltas: (blocks kept, blocks added) per step.
    assert [(c.num_kept_blocks, c.new_block_ids) for c in chunks] == [
        (0, [0, 1]),
        (2, [2]),
        (3, []),
        (3, []),
    ]
    assert req.output_token_ids == reference_output(req)
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert trace.finished == [req]
    assert sched.block_manager.num_free_blocks == 8
    assert sched.stats.steps == 4 and sched.stats.num_finished == 1


def test_many_requests_match_reference_and_free_everything() -> None:
    sched = make_scheduler(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", 3 + 5 * i, 2 + i, first=i) for i in range(9)]
    for r in reqs:
        sched.add_request(r)
    run_to_completion(sched)
    for r in reqs:
        assert r.output_token_ids == reference_output(r), r.request_id
    assert sched.block_manager.num_free_blocks == 64
    assert sched.num_waiting == sched.num_running == 0


def test_eos_finishes_early() -> None:
    sched = make_scheduler()
    probe = make_request("p", 5, 4)
    eos = reference_output(probe)[1]
    req = make_request("a", 5, 4, ignore_eos=False)
    req.eos_token_ids = (eos,)
    sched.add_request(req)
    trace = run_to_completion(sched)
    assert req.output_token_ids == reference_output(probe)[:2]
    assert req.finish_reason is FinishReason.STOP
    assert trace.finished == [req]


def test_fcfs_admission_and_seat_cap() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [make_request(f"r{i}", 4, 3) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule(0.0)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 2


def test_block_table_deltas_rebuild_the_table_and_may_be_applied_twice() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    sched.add_request(make_request("a", 10, 3))
    tables = BlockTables()
    for t in range(3):
        out = sched.schedule(float(t))
        tables.apply(out)
        tables.apply(out)  # e.g. a batch split and its part run again
        assert tables["a"] == sched.block_manager.get_block_table("a")
        sched.update_from_output(out, {"a": 1} if out.chunks[0].needs_sample else {}, float(t))
    stale = SchedulerOutput(chunks=[replace(out.chunks[0], num_kept_blocks=5)])
    with pytest.raises(AssertionError, match="holds 3 blocks, the chunk keeps 5"):
        tables.apply(stale)  # a missed delta is caught
    tables.drop("a")
    with pytest.raises(KeyError):
        tables["a"]


def test_finished_request_frees_blocks_and_seat_taken_next_step() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=1)
    a, b = make_request("a", 4, 1), make_request("b", 4, 2)
    sched.add_request(a)
    sched.add_request(b)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    out = step(sched, runner, 0.0, trace)
    assert [c.request_id for c in out.chunks] == ["a"]
    assert trace.finished == [a]
    assert sched.block_manager.num_free_blocks == 4  # freed at once, before the next step
    out = step(sched, runner, 1.0, trace)
    assert [c.request_id for c in out.chunks] == ["b"]
    assert runner.tables["b"] == [1]  # 0 went to the back of the free list


# ---- chunked prefill -----------------------------------------------------------------------


def test_long_prompt_does_not_starve_decodes() -> None:
    sched = make_scheduler(
        num_blocks=256, block_size=16, max_num_seqs=16, max_num_batched_tokens=64
    )
    decoders = [make_request(f"d{i}", 8, 200, first=i) for i in range(8)]
    for r in decoders:
        sched.add_request(r)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    step(sched, runner, 0.0, trace)  # 8 x 8 prompt tokens fill the 64-token budget
    assert all(r.num_output_tokens == 1 for r in decoders)

    long = make_request("long", 1000, 5, first=99)
    sched.add_request(long)
    prefill_steps = 0
    while long.num_output_tokens == 0:
        out = step(sched, runner, 1.0 + prefill_steps, trace)
        prefill_steps += 1
        by_id = {c.request_id: c for c in out.chunks}
        for r in decoders:  # every decoder gets exactly one token in every step
            assert len(by_id[r.request_id].token_ids) == 1 and by_id[r.request_id].needs_sample
        chunk = by_id["long"]
        assert len(chunk.token_ids) == min(56, 1000 - chunk.start_pos)
        assert chunk.needs_sample == (chunk.end_pos == 1000)
        assert out.num_batched_tokens <= 64
    assert prefill_steps == 18  # ceil(1000 / 56)
    assert all(r.num_output_tokens == 1 + prefill_steps for r in decoders)
    run_to_completion(sched, runner)
    assert long.output_token_ids == reference_output(long)
    for r in decoders:
        assert r.output_token_ids == reference_output(r)


# ---- preemption ----------------------------------------------------------------------------


def test_preemption_tie_goes_to_most_recently_admitted() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    a, b = make_request("a", 2, 6), make_request("b", 2, 6, first=5)
    sched.add_request(a)
    sched.add_request(b)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    for t in range(3):  # a: [0, 2], b: [1, 3], 4 tokens each computed after step 3
        step(sched, runner, float(t), trace)
    assert sched.block_manager.get_block_table("a") == [0, 2]
    assert sched.block_manager.get_block_table("b") == [1, 3]
    out = step(sched, runner, 3.0, trace)  # a needs a 3rd block: b (same cost, newer) goes
    assert out.preempted_ids == ["b"]
    assert [c.request_id for c in out.chunks] == ["a"]
    assert runner.tables["a"] == [0, 2, 1]
    assert (out.chunks[0].num_kept_blocks, out.chunks[0].new_block_ids) == (2, [1])
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.waiting[0] is b
    assert sched.stats.num_preemptions == 1
    run_to_completion(sched, runner)
    assert a.output_token_ids == reference_output(a)
    assert b.output_token_ids == reference_output(b)
    assert sched.stats.num_recomputed_tokens == 4


def test_request_that_is_cheapest_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    short, long = make_request("short", 2, 4), make_request("long", 6, 3, first=3)
    sched.add_request(short)
    sched.add_request(long)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    out = step(sched, runner, 0.0, trace)  # short: [0], long: [1, 2, 3]
    assert [runner.tables[c.request_id] for c in out.chunks] == [[0], [1, 2, 3]]
    out = step(sched, runner, 1.0, trace)  # short (first, cheapest) needs a block: itself
    assert out.preempted_ids == ["short"]
    assert [(c.request_id, runner.tables[c.request_id]) for c in out.chunks] == [
        ("long", [1, 2, 3, 0])
    ]
    run_to_completion(sched, runner)
    assert short.output_token_ids == reference_output(short)
    assert long.output_token_ids == reference_output(long)


def test_already_scheduled_cheaper_request_is_unscheduled() -> None:
    sched = make_scheduler(num_blocks=5, block_size=2)
    long, short = make_request("long", 6, 4, first=3), make_request("short", 2, 4)
    sched.add_request(long)
    sched.add_request(short)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    step(sched, runner, 0.0, trace)  # long: [0, 1, 2], short: [3]
    out = step(sched, runner, 1.0, trace)  # long needs a 4th block (4 is free), short a 2nd
    assert [(c.request_id, runner.tables[c.request_id]) for c in out.chunks] == [
        ("long", [0, 1, 2, 4])
    ]
    assert out.preempted_ids == ["short"]
    assert out.num_batched_tokens == 1
    run_to_completion(sched, runner)
    assert short.output_token_ids == reference_output(short)


def test_preemption_under_pressure_gives_the_unpressured_tokens() -> None:
    def run(num_blocks: int) -> tuple[list[list[int]], int]:
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32)
        reqs = [make_request(f"r{i}", 6 + i, 12, first=i) for i in range(6)]
        for r in reqs:
            sched.add_request(r)
        run_to_completion(sched)
        assert sched.block_manager.num_free_blocks == num_blocks
        return [r.output_token_ids for r in reqs], sched.stats.num_preemptions

    relaxed, relaxed_preemptions = run(200)
    pressured, preemptions = run(7)
    assert relaxed_preemptions == 0
    assert preemptions > 0
    assert pressured == relaxed


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, 2, 6))
    runner, trace = FakeRunner(sched.block_manager), Trace()
    for t in range(3):
        step(sched, runner, float(t), trace)
    sched.add_request(make_request("c", 1, 1))
    out = step(sched, runner, 3.0, trace)
    assert out.preempted_ids == ["b"]
    assert [c.request_id for c in out.chunks] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


# ---- finishing from outside and invalid input --------------------------------------------


def test_finish_and_abort_in_every_state() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2)
    for rid in ("a", "b", "w"):
        sched.add_request(make_request(rid, 2, 6))
    runner, trace = FakeRunner(sched.block_manager), Trace()
    for t in range(4):  # b is preempted at step 4 (see the tie test); w waits behind it
        step(sched, runner, float(t), trace)
    a, b, w = (sched.get_request(r) for r in ("a", "b", "w"))
    assert a and b and w
    assert (a.status, b.status, w.status) == (
        RequestStatus.RUNNING,
        RequestStatus.PREEMPTED,
        RequestStatus.WAITING,
    )
    assert sched.abort_request("w", 5.0) is w
    assert w.status is RequestStatus.FINISHED_ABORTED and w.finished_time == 5.0
    assert sched.finish_request("b", FinishReason.ERROR, 5.0, error="oom") is b
    assert b.error == "oom" and b.finish_reason is FinishReason.ERROR
    assert sched.finish_request("a", FinishReason.STOP, 5.0) is a  # e.g. a stop string
    assert a.status is RequestStatus.FINISHED_STOPPED
    assert sched.abort_request("a", 6.0) is None  # already finished
    assert sched.abort_request("nope", 6.0) is None
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 4
    sched.block_manager.check_integrity()


def test_abort_while_step_runs_is_skipped_by_update() -> None:
    sched = make_scheduler()
    a, b = make_request("a", 4, 3), make_request("b", 4, 3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule(0.0)
    sampled = FakeRunner(sched.block_manager).execute(out)
    sched.abort_request("a", 0.5)
    assert sched.update_from_output(out, sampled, 1.0) == []
    assert a.output_token_ids == [] and b.num_output_tokens == 1


def test_missing_sample_is_an_assertion() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 4, 3))
    out = sched.schedule(0.0)
    with pytest.raises(AssertionError, match="no sampled token for 'a'"):
        sched.update_from_output(out, {}, 1.0)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (make_request("empty", 0, 4), "request 'empty': the prompt is empty"),
        (
            make_request("long", 90, 20),
            r"prompt \(90 tokens\) \+ max_tokens \(20\) = 110 exceeds max_model_len \(100\)",
        ),
        (
            make_request("big", 40, 10),
            r"needs up to 13 KV blocks of 4 tokens, but the whole cache has 12",
        ),
    ],
)
def test_invalid_requests_rejected_others_served(request_: Request, message: str) -> None:
    sched = make_scheduler(num_blocks=12, block_size=4, max_model_len=100)
    good = make_request("good", 5, 3)
    sched.add_request(good)
    with pytest.raises(InvalidRequestError, match=message):
        sched.add_request(request_)
    assert sched.get_request(request_.request_id) is None
    assert sched.num_waiting == 1
    run_to_completion(sched)
    assert good.output_token_ids == reference_output(good)


def test_exactly_fitting_request_is_accepted() -> None:
    sched = make_scheduler(num_blocks=12, block_size=4, max_model_len=100)
    req = make_request("fits", 40, 9)  # 48 KV slots at most = 12 blocks
    sched.add_request(req)
    run_to_completion(sched)
    assert req.output_token_ids == reference_output(req)


def test_duplicate_id_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, 3))
    with pytest.raises(InvalidRequestError, match="request id 'a' is already in use"):
        sched.add_request(make_request("a", 3, 3))


@pytest.mark.parametrize("field_", ["max_num_seqs", "max_num_batched_tokens", "num_blocks"])
def test_config_validation(field_: str) -> None:
    # The scheduler's limits come from EngineConfig and the BlockManager, validated there.
    with pytest.raises(ValueError, match=f"{field_} must be an int >= 1"):
        if field_ == "num_blocks":
            BlockManager(0, 4)
        else:
            EngineConfig(**{field_: 0})


def test_block_manager_mismatch_asserts() -> None:
    cfg = EngineConfig(block_size=4)
    with pytest.raises(AssertionError, match="block_size 16 != config 4"):
        ContinuousScheduler(cfg, BlockManager(4, 16), 64)
    assert ContinuousScheduler(cfg, BlockManager(4, 4), 64).block_manager.num_blocks == 4


# ---- property test: random arrivals and aborts under a tiny block budget ---------------

ARRIVALS = st.lists(
    st.tuples(
        st.integers(0, 12),  # arrival step
        st.integers(1, 24),  # prompt length
        st.integers(1, 10),  # max_tokens
        st.one_of(st.none(), st.integers(0, 40)),  # abort step (None = never)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    arrivals=ARRIVALS,
    num_blocks=st.integers(9, 16),
    block_size=st.sampled_from([2, 4]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 24),
)
def test_random_workload_finishes_everything(
    arrivals: list[tuple[int, int, int, int | None]],
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> None:
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, max_num_batched_tokens)
    runner, trace = FakeRunner(sched.block_manager), Trace()
    reqs = [make_request(f"r{i}", p, m, first=i) for i, (_, p, m, _) in enumerate(arrivals)]
    rejected = set()
    aborted = set()
    last_arrival = max(a[0] for a in arrivals)
    for t in range(3000):
        for i, (arrive, *_rest, abort_at) in enumerate(arrivals):
            if arrive == t:
                try:
                    sched.add_request(reqs[i])
                except InvalidRequestError:
                    rejected.add(i)
            if abort_at == t and sched.abort_request(reqs[i].request_id, float(t)):
                aborted.add(i)
        if t > max(last_arrival, 40) and not sched.has_unfinished():
            break
        step(sched, runner, float(t), trace)
    else:
        raise AssertionError("workload did not finish")
    for i, r in enumerate(reqs):
        if i in rejected:
            assert r.status is RequestStatus.WAITING
        elif i in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            assert r.output_token_ids == reference_output(r)[: r.num_output_tokens]
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH
            assert r.output_token_ids == reference_output(r)
    assert sched.block_manager.num_free_blocks == num_blocks
    sched.block_manager.check_integrity()
    event(f"preempted: {sched.stats.num_preemptions > 0}")
    event(f"aborted: {bool(aborted)}")

"""Priority scheduling, counted (never timed): order, preemption by cause, aging, and the
static family's next-batch order. The clock is the step number passed as ``now``."""

from __future__ import annotations

import pytest

from carpool.config import EngineConfig
from carpool.kv_cache import BlockManager
from carpool.request import Request
from carpool.sampling_params import SamplingParams
from carpool.scheduling import (
    BucketedPolicy,
    ContinuousScheduler,
    DynamicBatchPolicy,
    StaticBatchPolicy,
)
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.priority import RequestOrder


def next_token(context: list[int]) -> int:
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % 1000


def reference_output(req: Request) -> list[int]:
    ctx, out = list(req.prompt_token_ids), []
    for _ in range(req.sampling_params.max_tokens):
        out.append(next_token(ctx))
        ctx.append(out[-1])
    return out


def fake_sample(policy: SchedulingPolicy, out) -> dict[str, int]:
    """A model whose next token is a function of the request's known tokens (KV exactness is
    test_continuous_scheduler's business; here a preempted request must continue exactly)."""
    sampled = {}
    for c in out.chunks:
        if c.needs_sample:
            req = policy.get_request(c.request_id)
            sampled[c.request_id] = next_token(req.all_token_ids[: c.end_pos])
    return sampled


def make_request(rid: str, priority: int, arrival: float, prompt_len: int = 6, out: int = 8):
    prompt = [(len(rid) * 7 + i * 13 + priority) % 1000 for i in range(prompt_len)]
    params = SamplingParams(max_tokens=out, ignore_eos=True)
    return Request(rid, prompt, params, arrival_time=arrival, priority=priority)


def continuous(order: RequestOrder, seqs: int = 4, num_blocks: int = 64) -> ContinuousScheduler:
    cfg = EngineConfig(
        max_num_seqs=seqs,
        max_num_batched_tokens=64,
        block_size=4,
        scheduling_policy=order.policy,
        priority_aging_s=order.aging_s,
    )
    return ContinuousScheduler(cfg, BlockManager(num_blocks, 4), 4096)


def drive(policy: SchedulingPolicy, start: int, steps: int, finished: list[Request]) -> int:
    t = start
    for t in range(start, start + steps):
        if not policy.has_unfinished():
            break
        out = policy.schedule(float(t))
        finished += policy.update_from_output(out, fake_sample(policy, out), float(t))
    return t + 1


def late_vip_rank(policy_name: str) -> tuple[int, ContinuousScheduler]:
    """16 priority-10 requests saturate 4 seats; then a priority-0 one arrives. Returns how
    many priority-10 requests finished before it."""
    sched = continuous(RequestOrder(policy_name, aging_s=None))
    for i in range(16):
        sched.add_request(make_request(f"low{i}", 10, 0.0, out=20))
    finished: list[Request] = []
    t = drive(sched, 0, 3, finished)
    assert sched.num_running == 4 and sched.num_waiting == 12
    sched.add_request(make_request("vip", 0, float(t), out=20))
    drive(sched, t, 10_000, finished)
    ids = [r.request_id for r in finished]
    for r in finished:
        assert r.output_token_ids == reference_output(r), r.request_id
    return ids.index("vip"), sched


def test_late_priority_request_finishes_before_most() -> None:
    rank, sched = late_vip_rank("priority")
    assert rank < 8, f"vip finished after {rank} of the 16 priority-10 requests"
    # It took a seat at once: the seats were full, so it preempted a priority-10 request.
    assert sched.stats.num_preemptions_by_cause == {"priority": 1}
    fcfs_rank, fcfs = late_vip_rank("fcfs")
    assert fcfs_rank == 16  # fcfs serves it last: the priority policy made the difference
    assert fcfs.stats.num_preemptions == 0


def test_waiting_queue_order_is_priority_then_arrival() -> None:
    sched = continuous(RequestOrder("priority", aging_s=None), seqs=1)
    for rid, prio, arrival in [("a", 5, 0.0), ("b", 1, 2.0), ("c", 1, 1.0), ("d", 5, -1.0)]:
        sched.add_request(make_request(rid, prio, arrival, out=1))
    finished: list[Request] = []
    drive(sched, 0, 1000, finished)
    assert [r.request_id for r in finished] == ["c", "b", "d", "a"]


def test_equal_priority_never_preempts() -> None:
    sched = continuous(RequestOrder("priority", aging_s=None), seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 3, float(i), out=6))
    finished: list[Request] = []
    drive(sched, 0, 1000, finished)
    assert sched.stats.num_preemptions == 0
    assert [r.request_id for r in finished][:2] == ["r0", "r1"]


def test_victim_is_worst_priority_latest_arrival() -> None:
    order = RequestOrder("priority", aging_s=None)
    running = [
        make_request("a", 5, 0.0),
        make_request("b", 7, 1.0),
        make_request("c", 7, 3.0),
        make_request("d", 2, 4.0),
    ]
    assert order.worst(running, 10.0).request_id == "c"
    assert order.outranks(running[3], running[2], 10.0)
    assert not order.outranks(running[1], running[2], 10.0)
    assert not RequestOrder("fcfs").outranks(running[3], running[2], 10.0)


def test_kv_pressure_preempts_the_worst_priority_and_counts_the_cause() -> None:
    # 12 blocks of 4 tokens; 3 requests of 6 + 20 tokens need 7 blocks each: they cannot all fit.
    sched = continuous(RequestOrder("priority", aging_s=None), seqs=3, num_blocks=12)
    for rid, prio in [("p1", 1), ("p9", 9), ("p5", 5)]:
        sched.add_request(make_request(rid, prio, 0.0, out=20))
    finished: list[Request] = []
    drive(sched, 0, 1000, finished)
    for r in finished:
        assert r.output_token_ids == reference_output(r), r.request_id
    by_cause = sched.stats.num_preemptions_by_cause
    assert by_cause.get("kv_cache", 0) > 0 and "priority" not in by_cause
    assert [r.request_id for r in finished][0] == "p1"
    preemptions = {r.request_id: r.num_preemptions for r in finished}
    assert preemptions["p9"] > 0 and preemptions["p1"] == 0, preemptions


@pytest.mark.parametrize(("aging_s", "completes"), [(2.0, True), (None, False)])
def test_aging_lets_a_low_priority_request_complete(aging_s, completes) -> None:
    """A stream of priority-0 requests keeps both seats busy; a priority-10 one completes
    only with aging."""
    sched = continuous(RequestOrder("priority", aging_s=aging_s), seqs=2)
    sched.add_request(make_request("low", 10, 0.0, out=4))
    finished: list[Request] = []
    n = 0
    for t in range(300):
        while sched.num_waiting < 3:  # continuous high-priority load: always more waiting
            sched.add_request(make_request(f"hi{n}", 0, float(t), out=4))
            n += 1
        out = sched.schedule(float(t))
        finished += sched.update_from_output(out, fake_sample(sched, out), float(t))
    low_done = any(r.request_id == "low" for r in finished)
    assert low_done is completes
    assert len(finished) > 100  # the high-priority load was really served meanwhile


@pytest.mark.parametrize("kind", ["static", "bucketed", "dynamic"])
def test_static_family_orders_next_batch_by_priority(kind) -> None:
    config = EngineConfig(
        batch_size=2,
        block_size=4,
        scheduling_policy="priority",
        priority_aging_s=None,
        bucket_boundaries=(64,),
        max_wait_ms=0.0,
    )
    cls = {"static": StaticBatchPolicy, "bucketed": BucketedPolicy, "dynamic": DynamicBatchPolicy}
    policy: SchedulingPolicy = cls[kind](config, BlockManager(64, 4), 4096)
    for rid, prio in [("a", 5), ("b", 5), ("c", 0), ("d", 9), ("e", 0)]:
        policy.add_request(make_request(rid, prio, 0.0, out=3))
    finished: list[Request] = []
    drive(policy, 0, 1, finished)
    assert sorted(r.request_id for r in policy.batch) == ["c", "e"]
    # A running static batch is not preempted: a better request waits for the next batch.
    policy.add_request(make_request("vip", -5, 1.0, out=3))
    drive(policy, 1, 1000, finished)
    ids = [r.request_id for r in finished]
    assert sorted(ids[:2]) == ["c", "e"] and ids[2] == "vip"
    assert sorted(ids[3:5]) == ["a", "b"] and ids[5] == "d"
    assert policy.stats.num_preemptions == 0


def test_config_validates_the_policy() -> None:
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="priority_aging_s"):
        EngineConfig(priority_aging_s=0)
    with pytest.raises(ValueError, match="priority must be an int"):
        Request("x", [1], priority=1.5)  # type: ignore[arg-type]
    assert BlockManager(4, 4).enable_caching is False

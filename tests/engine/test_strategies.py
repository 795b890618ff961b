"""Every batching strategy and layout through the real engine on a tiny model.

Timing assertions use an injected clock where they can; the one wall-clock check has a bound
two orders of magnitude wider than what it measures.
"""

from __future__ import annotations

import random

import pytest

from carpool import LLM, LLMEngine, SamplingParams
from carpool.config import BATCHING_STRATEGIES, LAYOUTS, EngineConfig
from helpers.hf_models import first_difference
from helpers.tiny import make_prompts

# 24 mixed requests: prompts of 1-330 tokens, outputs of 1-24 tokens.
PROMPTS = make_prompts() + make_prompts(seed=1, lengths=[4, 9, 20, 40, 70, 100])
MAX_TOKENS = [1 + (7 * i) % 24 for i in range(len(PROMPTS))]
PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]
KNOBS = dict(
    dtype="float32",
    batch_size=6,
    max_wait_ms=5,
    num_buckets=3,
    max_num_batched_tokens=128,
    max_num_seqs=8,
)


class FakeClock:
    """An engine clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def sequential_tokens(tiny_llama) -> list[list[int]]:
    llm = LLM(tiny_llama.path, batching="sequential", **KNOBS)
    tokens = _tokens(llm)
    for p, got in list(zip(PROMPTS, tokens, strict=True))[:4]:  # the baseline is right too
        expected = tiny_llama.reference(p, len(got))
        assert got == expected, first_difference(got, expected)
    return tokens


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batching", BATCHING_STRATEGIES)
def test_every_strategy_and_layout_matches_sequential(
    tiny_llama, sequential_tokens, batching, layout, device
):
    # The baseline ran on the CPU: on a GPU this compares across devices too.
    llm = LLM(tiny_llama.path, batching=batching, layout=layout, device=device, **KNOBS)
    for i, (got, expected) in enumerate(zip(_tokens(llm), sequential_tokens, strict=True)):
        assert got == expected, f"request {i} ({len(PROMPTS[i])}-token prompt): " + (
            first_difference(got, expected)
        )
    records = list(llm.engine.stats.records)
    padded = sum(r.num_padded_tokens for r in records)
    assert (padded > 0) == (layout == "padded" and batching != "sequential"), padded
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_static_releases_the_batch_together_after_the_slowest(tiny_llama):
    clock = FakeClock()
    engine = LLMEngine(
        EngineConfig(
            model=tiny_llama.path, dtype="float32", batching="static", layout="padded", batch_size=4
        ),
        clock=clock,
    )
    lengths = {"a": 2, "b": 5, "c": 9, "d": 3}
    for rid, n in lengths.items():
        engine.add_request(
            PROMPTS[len(rid) + ord(rid) % 7],
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
            request_id=rid,
        )
    finished_at: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        clock.t = float(step)
        for out in engine.step():
            assert len(out.outputs[0].token_ids) <= lengths[out.request_id]
            if out.finished:
                finished_at[out.request_id] = step
        step += 1
    assert finished_at == dict.fromkeys(lengths, 8), "all four released at the slowest's step"
    records = list(engine.stats.records)
    # Finished rows keep their seats: 4 rows every step, padded rows counted as waste.
    assert [r.num_seqs + r.num_idle_seats for r in records] == [4] * 9
    assert [r.num_idle_seats for r in records] == [0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert all(r.num_padded_tokens >= r.num_idle_seats for r in records)


def test_dynamic_launch_on_full_queue_and_on_timer(tiny_llama):
    clock = FakeClock(0.0)
    engine = LLMEngine(
        EngineConfig(
            model=tiny_llama.path, dtype="float32", batching="dynamic", batch_size=8, max_wait_ms=50
        ),
        clock=clock,
    )
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(8):  # 8 quick arrivals launch at once
        clock.t = i * 0.001
        engine.add_request(PROMPTS[i], params, request_id=f"q{i}")
    engine.step()
    assert engine.stats.records[-1].num_seqs == 8
    while engine.has_unfinished():
        clock.t += 0.01
        engine.step()

    clock.t = 10.0
    engine.add_request(PROMPTS[3], params, request_id="lone")
    steps = engine.stats.steps
    assert engine.step() == [] and engine.stats.steps == steps, "launched before its timer"
    assert engine.next_wake_time() == pytest.approx(10.05)
    clock.t = 10.049
    engine.step()
    assert engine.stats.steps == steps
    clock.t = 10.05
    engine.step()
    assert engine.stats.records[-1].num_seqs == 1
    assert engine.policy.get_request("lone").timings().queue_wait == pytest.approx(0.05)


def test_dynamic_generate_sleeps_to_the_deadline_and_caps_batches(tiny_llama):
    llm = LLM(tiny_llama.path, dtype="float32", batching="dynamic", batch_size=8, max_wait_ms=50)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    lone = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    wait = lone.timings[0].queue_wait
    assert 0.045 <= wait < 5.0, f"a lone request launched after {wait:.3f}s, not ~0.05s"
    llm.generate(PROMPTS[:20], params, use_tqdm=False)
    assert max(r.num_seqs for r in llm.engine.stats.records) == 8


def test_bucketed_wastes_less_padding_than_static(tiny_llama):
    rng = random.Random(0)
    # Skewed prompt lengths, interleaved so that static batches mix short and long prompts.
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in [4, 200, 6, 180, 5, 220, 3, 190]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def waste(batching: str) -> float:
        llm = LLM(
            tiny_llama.path,
            dtype="float32",
            batching=batching,
            layout="padded",
            batch_size=4,
            bucket_boundaries=(16, 256),
        )
        llm.generate(prompts, params, use_tqdm=False)
        recs = llm.engine.stats.records
        padded = sum(r.num_padded_tokens for r in recs)
        return padded / (padded + sum(r.num_tokens for r in recs))

    static, bucketed = waste("static"), waste("bucketed")
    assert bucketed < static / 2, (bucketed, static)


def test_continuous_short_request_overtakes_a_long_one(tiny_llama):
    engine = LLMEngine(EngineConfig(model=tiny_llama.path, dtype="float32"))
    engine.add_request(
        PROMPTS[10],
        SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
        request_id="long",
    )
    for _ in range(3):
        engine.step()
    engine.add_request(
        PROMPTS[4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), request_id="short"
    )
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["short", "long"]

"""Prefix caching through the real engine: greedy tokens identical with the cache on and off.

Workloads: requests behind shared system prompts, multi-turn chats (each turn's prompt is the
previous prompt + its answer + a new message), ``n > 1`` siblings, and a KV budget small enough
to force preemption and eviction. The cache must also really be used (hits counted, prefill
tokens saved) and leave the BlockManager consistent.
"""

from __future__ import annotations

import random

import pytest

from carpool import LLMEngine, SamplingParams
from carpool.config import LAYOUTS, EngineConfig
from carpool.outputs import RequestOutput
from helpers.hf_models import first_difference

RNG = random.Random(13)
SYSTEMS = [[RNG.randrange(3, 320) for _ in range(70)] for _ in range(2)]
SUFFIXES = [[RNG.randrange(3, 320) for _ in range(RNG.randrange(1, 20))] for _ in range(8)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def make_engine(tiny, caching: bool, **knobs) -> LLMEngine:
    knobs = {"max_num_batched_tokens": 64, "max_num_seqs": 8, **knobs}
    return LLMEngine(
        EngineConfig(model=tiny.path, dtype="float32", enable_prefix_caching=caching, **knobs)
    )


def drain(engine: LLMEngine) -> dict[str, RequestOutput]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
    return done


def shared_prompt_run(tiny, caching: bool, **knobs) -> tuple[list[list[int]], LLMEngine]:
    """8 requests behind 2 system prompts, in two waves so the second wave can hit."""
    engine = make_engine(tiny, caching, **knobs)
    tokens = []
    for wave in (range(4), range(4, 8)):
        for i in wave:
            engine.add_request(SYSTEMS[i % 2] + SUFFIXES[i], GREEDY, request_id=f"r{i}")
        done = drain(engine)
        tokens += [done[f"r{i}"].outputs[0].token_ids for i in wave]
    return tokens, engine


def assert_same(on: list[list[int]], off: list[list[int]]) -> None:
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        assert a == b, f"request {i}, cache on vs off: " + first_difference(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_system_prompts_same_tokens(tiny, layout):
    on, engine = shared_prompt_run(tiny, True, layout=layout)
    off, engine_off = shared_prompt_run(tiny, False, layout=layout)
    assert_same(on, off)
    for i in (0, 4):  # and right, not just consistent: r4 read its system prompt from the cache
        expected = tiny.reference(SYSTEMS[i % 2] + SUFFIXES[i], 12)
        assert on[i] == expected, first_difference(on[i], expected)
    stats = engine.block_manager.prefix_cache_stats
    # Wave 2 hits the 4 full blocks (64 tokens) of its system prompt, at least.
    assert stats.hits >= 4 * 64, stats
    assert engine.stats.prompt_tokens < engine_off.stats.prompt_tokens
    assert engine_off.block_manager.prefix_cache_stats.queries == 0


def test_cached_tokens_reported_per_request(tiny_llama):
    engine = make_engine(tiny_llama, True)
    engine.add_request(SYSTEMS[0] + SUFFIXES[0], GREEDY, request_id="a")
    first = drain(engine)["a"]
    engine.add_request(SYSTEMS[0] + SUFFIXES[1], GREEDY, request_id="b")
    second = drain(engine)["b"]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # the 4 full blocks of the 70-token system prompt


def test_multi_turn_chat_same_tokens(tiny_llama):
    """3 conversations x 3 turns, interleaved: turn k+1 = turn k's prompt + answer + message."""

    def run(caching: bool) -> tuple[list[list[int]], LLMEngine]:
        engine = make_engine(tiny_llama, caching)
        rng = random.Random(5)
        prompts = [[rng.randrange(3, 320) for _ in range(20 + 9 * c)] for c in range(3)]
        answers = []
        for turn in range(3):
            for c in range(3):
                engine.add_request(prompts[c], GREEDY, request_id=f"c{c}t{turn}")
            done = drain(engine)
            for c in range(3):
                answer = done[f"c{c}t{turn}"].outputs[0].token_ids
                answers.append(answer)
                message = [rng.randrange(3, 320) for _ in range(5 + c)]
                prompts[c] = prompts[c] + answer + message
        return answers, engine

    on, engine = run(True)
    off, _ = run(False)
    assert_same(on, off)
    # Later turns reuse the previous turn's prompt *and* answer blocks.
    stats = engine.block_manager.prefix_cache_stats
    assert stats.hit_rate > 0.4, stats


def test_n_siblings_share_the_prompt_blocks(tiny_llama):
    prompt = SYSTEMS[1] + SUFFIXES[3]  # 70 + a few tokens: 4 full blocks before the last token
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=3)

    def run(caching: bool) -> tuple[RequestOutput, LLMEngine]:
        engine = make_engine(tiny_llama, caching, max_num_batched_tokens=256)
        engine.add_request(prompt, params, request_id="g")
        return drain(engine)["g"], engine

    on, engine = run(True)
    off, engine_off = run(False)
    assert_same([o.token_ids for o in on.outputs], [o.token_ids for o in off.outputs])
    full = (len(prompt) - 1) // 16
    # Siblings 2 and 3 waited one step for sibling 1's blocks and computed none of them.
    assert engine.block_manager.prefix_cache_stats.hits == 2 * full * 16
    assert engine_off.stats.prompt_tokens - engine.stats.prompt_tokens == 2 * full * 16


def test_preemption_and_eviction_same_tokens(tiny_llama):
    """A KV budget that forces preemption (recompute reuses cached blocks) and eviction."""

    def run(caching: bool) -> tuple[list[list[int]], LLMEngine]:
        # 512 bytes per token; 24 blocks of 16 tokens.
        engine = make_engine(
            tiny_llama, caching, kv_cache_memory=24 * 16 * 512, max_num_batched_tokens=96
        )
        for i in range(8):
            engine.add_request(
                SYSTEMS[i % 2] + SUFFIXES[i],
                SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                request_id=f"r{i}",
            )
        done = drain(engine)
        return [done[f"r{i}"].outputs[0].token_ids for i in range(8)], engine

    on, engine = run(True)
    off, engine_off = run(False)
    assert_same(on, off)
    assert engine.policy.stats.num_preemptions > 0, "the budget was meant to force preemption"
    assert engine_off.policy.stats.num_preemptions > 0
    assert engine.block_manager.prefix_cache_stats.hits > 0


def test_failed_step_drops_the_cache_of_its_requests(tiny_llama, monkeypatch):
    engine = make_engine(tiny_llama, True)
    engine.add_request(SYSTEMS[0] + SUFFIXES[0], GREEDY, request_id="ok")
    drain(engine)
    cached = engine.block_manager.num_cached_blocks
    assert cached > 0

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    engine.add_request(SYSTEMS[1] + SUFFIXES[1] * 5, GREEDY, request_id="bad")
    engine.step()  # first chunk computed and cached
    grown = engine.block_manager.num_cached_blocks
    assert grown > cached
    monkeypatch.setattr(engine.runner, "execute", broken)
    outs = engine.step()
    assert outs[0].outputs[0].finish_reason == "error"
    engine.block_manager.check_integrity()
    # The failed request's blocks are uncached; the earlier request's stay.
    assert engine.block_manager.num_cached_blocks == cached


@pytest.mark.parametrize("batching", ["static", "bucketed", "dynamic", "sequential"])
def test_static_family_does_not_use_the_cache(tiny_llama, batching):
    """The static family prefills every prompt whole: same tokens, no lookup, nothing cached."""
    engine = make_engine(tiny_llama, True, batching=batching, batch_size=4, max_wait_ms=0)
    for i in range(6):
        engine.add_request(SYSTEMS[0] + SUFFIXES[i], GREEDY, request_id=f"r{i}")
    done = drain(engine)
    ref, _ = shared_prompt_run(tiny_llama, False)
    assert [done[f"r{i}"].outputs[0].token_ids for i in (0, 2, 4)] == [ref[0], ref[2], ref[4]]
    assert engine.block_manager.prefix_cache_stats.queries == 0
    assert engine.block_manager.num_cached_blocks == 0

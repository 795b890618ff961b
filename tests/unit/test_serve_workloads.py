"""The shared-prefix, multi-turn and priority-class workloads of ``carpool bench serve``."""

from __future__ import annotations

import pytest

from carpool.bench.serve_load import RequestResult
from carpool.bench.serve_summary import summarize
from carpool.bench.serve_workloads import (
    multi_turn_conversations,
    parse_priority_classes,
    shared_prefix_prompts,
    with_priorities,
)


def test_shared_prefix_prompts_share_exactly_l_tokens() -> None:
    prompts = shared_prefix_prompts(12, 3, 1000, 111, 16, seed=0, vocab_size=259)
    assert len(prompts) == 12 and all(p.max_tokens == 16 for p in prompts)
    for i, p in enumerate(prompts):
        assert isinstance(p.prompt, list) and all(3 <= t < 259 for t in p.prompt)
        assert p.prompt[:1000] == prompts[i % 3].prompt[:1000]
        assert 55 <= len(p.prompt) - 1000 <= 166
    assert prompts[0].prompt[:1000] != prompts[1].prompt[:1000]
    shared = sum(1000 for _ in prompts) / sum(len(p.prompt) for p in prompts)
    assert 0.85 < shared < 0.95  # "90% shared" with L = 1000 and suffixes of ~111
    assert shared_prefix_prompts(12, 3, 1000, 111, 16, seed=0, vocab_size=259) == prompts
    with pytest.raises(ValueError):
        shared_prefix_prompts(1, 0, 10, 1, 1, seed=0)


def test_priority_classes_and_per_class_summary() -> None:
    assert parse_priority_classes("0:1,10:9") == [(0, 0.1), (10, 0.9)]
    for bad in ("", "a:1", "0:0", "0"):
        with pytest.raises(ValueError):
            parse_priority_classes(bad)
    prompts = with_priorities(
        shared_prefix_prompts(400, 1, 4, 2, 1, seed=1), [(0, 0.1), (10, 0.9)], 1
    )
    n0 = sum(p.priority == 0 for p in prompts)
    assert 20 <= n0 <= 70 and all(p.priority in (0, 10) for p in prompts)

    results = [
        RequestResult(ok=True, ttft=0.01, latency=0.1, output_tokens=2, priority=0),
        RequestResult(ok=True, ttft=0.5, latency=1.0, output_tokens=2, priority=10),
        RequestResult(ok=True, ttft=0.7, latency=1.0, output_tokens=2, priority=10),
    ]
    s = summarize(results, 2.0)
    assert s["by_priority"]["0"]["completed"] == 1
    assert s["by_priority"]["0"]["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert s["by_priority"]["10"]["ttft_ms"]["p50"] == pytest.approx(600.0)


def test_cached_tokens_hit_rate_in_summary() -> None:
    results = [
        RequestResult(
            ok=True, ttft=0.1, latency=0.2, output_tokens=1, prompt_tokens=100, cached_tokens=0
        ),
        RequestResult(
            ok=True, ttft=0.1, latency=0.2, output_tokens=1, prompt_tokens=100, cached_tokens=96
        ),
    ]
    s = summarize(results, 1.0)
    assert s["total_cached_tokens"] == 96 and s["prefix_cache_hit_rate"] == pytest.approx(0.48)
    assert "by_priority" not in s


def test_multi_turn_conversations_are_reproducible() -> None:
    convs = multi_turn_conversations(3, 4, 10, seed=2)
    assert len(convs) == 3 and all(len(c) == 4 for c in convs)
    assert all(1 <= len(m.split()) <= 10 for c in convs for m in c)
    assert multi_turn_conversations(3, 4, 10, seed=2) == convs

"""Prefix caching and priority over HTTP: ``usage.prompt_tokens_details.cached_tokens``, the
``priority`` field, ``/v1/stats`` hit rate and the Prometheus counters."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-llama"
PROMPT = list(range(5, 75))  # 70 token ids: 4 full blocks of 16 before the last token


def counters(srv) -> dict[str, float]:
    """Unlabelled (but for model_name) sample name -> value, parsed by Prometheus' parser."""
    text = httpx.get(f"{srv.url}/metrics").text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if set(s.labels) == {"model_name"}
    }


def test_cached_tokens_stats_and_counters(make_server):
    srv = make_server(scheduling_policy="priority")
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(
        model=MODEL, prompt=PROMPT + [9], max_tokens=4, temperature=0, extra_body={"priority": 3}
    )
    assert second.usage.prompt_tokens == 71
    assert second.usage.prompt_tokens_details.cached_tokens == 64
    stats = srv.wait_idle()
    assert stats["prefix_cache_queries"] == 70 + 71
    assert stats["prefix_cache_hits"] == 64
    assert abs(stats["prefix_cache_hit_rate"] - 64 / 141) < 1e-9
    assert stats["num_preemptions_by_cause"] == {"kv_cache": 0, "priority": 0}
    m = counters(srv)
    assert m["carpool:prefix_cache_queries_total"] == 141
    assert m["carpool:prefix_cache_hits_total"] == 64


def test_priority_field_is_validated(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "priority": "high"}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=30)
    assert r.status_code == 400 and "priority" in r.text


def test_bench_multi_turn_mode_hits_the_cache(server):
    """``carpool bench serve --multi-turn``: every turn after the first re-sends the previous
    prompt + answer, so the server reports cached prompt tokens for it."""
    import asyncio

    from carpool.bench.serve_load import LoadSpec
    from carpool.bench.serve_workloads import multi_turn_conversations, run_multi_turn

    spec = LoadSpec(url=server.url, model=MODEL, extra_body={"temperature": 0})
    conversations = multi_turn_conversations(2, 3, 12, seed=0)
    results, _ = asyncio.run(run_multi_turn(spec, conversations, max_tokens=8))
    assert len(results) == 6 and all(r.ok for r in results), results
    for i, r in enumerate(results):
        assert r.cached_tokens is not None and r.prompt_tokens is not None
        if i % 3:  # later turns of a conversation
            assert r.cached_tokens >= 16, (i, r.cached_tokens, r.prompt_tokens)

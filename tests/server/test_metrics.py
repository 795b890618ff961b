"""``/metrics`` parses with Prometheus' parser and its counters match the traffic sent."""

from __future__ import annotations

import httpx
import openai

from carpool import SamplingParams
from helpers.metrics import scrape as scrape_metrics

MODEL = "tiny-llama"


def scrape(srv) -> dict[str, float]:
    """Sample name (+ labels other than model_name) -> value; every sample is this model's."""
    return scrape_metrics(srv.url, MODEL)


def success(m: dict[str, float], reason: str) -> float:
    return m[f"carpool:request_success_total[('finished_reason', '{reason}')]"]


def test_metrics_match_traffic(make_server, reference):
    srv = make_server()
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
    m0 = scrape(srv)
    assert m0["carpool:prompt_tokens_total"] == 0 and m0["carpool:generation_tokens_total"] == 0

    prompt_tokens = completion_tokens = 0
    completions = 0
    # 3 requests that end by length
    for p in ["a", "bb cc", "def f(x):"]:
        r = client.completions.create(
            model=MODEL, prompt=p, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
        completions += 1
    # 1 request that ends on a stop string
    full = (
        reference.generate(["hello"], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[
            0
        ]
        .outputs[0]
        .text
    )
    i = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i] and full[i].strip())
    r = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=20, temperature=0, stop=full[i]
    )
    assert r.choices[0].finish_reason == "stop"
    prompt_tokens += r.usage.prompt_tokens
    completion_tokens += r.usage.completion_tokens
    completions += 1
    # 1 streaming chat with n=2 (one request, two completions)
    usage = None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        usage = chunk.usage or usage
    prompt_tokens += usage.prompt_tokens
    completion_tokens += usage.completion_tokens
    completions += 2
    srv.wait_idle()

    m = scrape(srv)
    # Every per-request metric counts completions (vLLM's child requests): the n=2 chat is 2.
    assert success(m, "length") == 5
    assert success(m, "stop") == 1
    assert success(m, "abort") == 0 and success(m, "error") == 0
    assert m["carpool:request_prompt_tokens_count"] == completions
    assert m["carpool:request_generation_tokens_count"] == completions
    assert m["carpool:prompt_tokens_total"] == prompt_tokens
    assert m["carpool:generation_tokens_total"] == completion_tokens
    assert m["carpool:time_to_first_token_seconds_count"] == completions
    assert m["carpool:e2e_request_latency_seconds_count"] == completions
    assert m["carpool:request_queue_time_seconds_count"] == completions
    assert m["carpool:inter_token_latency_seconds_count"] == completion_tokens - completions
    assert m["carpool:request_generation_tokens_sum"] == completion_tokens
    steps = srv.stats()["steps"]
    assert m["carpool:iteration_batch_size_count"] == steps
    assert m["carpool:iteration_tokens_total_count"] == steps
    assert m["carpool:num_requests_running"] == 0 and m["carpool:num_requests_waiting"] == 0
    assert m["carpool:kv_cache_usage_perc"] == 0
    assert m["carpool:num_preemptions_total"] == 0

    # A timed-out request is counted as such, its prompt too.
    r = httpx.post(
        f"{srv.base_url}/completions",
        timeout=30,
        json={
            "model": MODEL,
            "prompt": "x y z",
            "max_tokens": 1000,
            "ignore_eos": True,
            "timeout": 0.05,  # 1,000 tokens take ~0.3-1 s: well before
        },
    )
    assert r.status_code == 504
    srv.wait_idle()
    m2 = scrape(srv)
    assert success(m2, "timeout") == 1
    assert m2["carpool:prompt_tokens_total"] == prompt_tokens + len(
        reference.tokenizer.encode("x y z")
    )

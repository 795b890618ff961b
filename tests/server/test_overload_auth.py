"""Backpressure (429 + Retry-After beyond --max-queue) and the API key."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from carpool import SamplingParams
from carpool.server import ServerConfig

MODEL = "tiny-llama"


@pytest.mark.slow
def test_burst_beyond_max_queue_gets_429(make_server, reference):
    srv = make_server(ServerConfig(max_queue=4, retry_after=2), max_num_seqs=2)
    prompts = [f"Request {i}: def f(x):" for i in range(40)]

    async def one(client: httpx.AsyncClient, prompt: str) -> httpx.Response:
        return await client.post(
            "/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
            },
        )

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    responses = asyncio.run(burst())
    ok = [(p, r) for p, r in zip(prompts, responses, strict=True) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 40, sorted({r.status_code for r in responses})
    assert refused, "a burst of 40 with max_queue=4 and 2 seats must be refused in part"
    assert len(ok) >= 4
    for r in refused:
        assert r.headers["retry-after"] == "2"
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "max_queue" in err["message"]
    exp = reference.generate(
        [p for p, _ in ok],
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    for (_, r), e in zip(ok, exp, strict=True):
        assert r.json()["choices"][0]["text"] == e.outputs[0].text
    s = srv.wait_idle()
    assert s["num_free_blocks"] == s["num_blocks"]
    assert s["mean_batch_size"] > 1
    # Then it serves normally.
    r = httpx.post(
        f"{srv.base_url}/completions",
        timeout=30,
        json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
    )
    assert r.status_code == 200, r.text
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert (
        f'carpool:num_requests_rejected_total{{model_name="{MODEL}"}} {len(refused)}.0' in metrics
    )


def test_api_key(make_server):
    srv = make_server(ServerConfig(api_key="s3cret"))
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    url = f"{srv.base_url}/completions"
    assert httpx.post(url, json=body).status_code == 401
    for header in ("Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2", "Bearer x"):
        r = httpx.post(url, json=body, headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.url}/health").status_code == 200  # stays open
    assert httpx.get(f"{srv.base_url}/models").status_code == 401
    good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=srv.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)

"""64 concurrent streaming clients all get complete, correct outputs, batched together."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from carpool import SamplingParams

MODEL = "tiny-llama"


@pytest.mark.slow
def test_64_concurrent_streams(make_server, reference):
    srv = make_server()
    prompts = [f"Request {i}: " + "word " * (i % 7) for i in range(64)]
    max_tokens = 16

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        text, finish, chunks = "", None, 0
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            chunks += 1
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
        return text, finish, chunks

    async def main() -> list[tuple[str, str | None, int]]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=300)
        client = openai.AsyncOpenAI(
            base_url=srv.base_url, api_key="x", max_retries=0, http_client=http
        )
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(main())
    exp = reference.generate(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False
    )
    for i, ((text, finish, _), e) in enumerate(zip(results, exp, strict=True)):
        assert text == e.outputs[0].text, f"client {i}: {text!r} != {e.outputs[0].text!r}"
        assert finish == e.outputs[0].finish_reason
    stats = srv.wait_idle()
    assert stats["mean_batch_size"] > 1, stats
    metrics = httpx.get(f"{srv.url}/metrics").text
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("carpool:iteration_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("carpool:iteration_batch_size_count"):
            count = float(line.split()[-1])
    assert count > 0 and total / count > 1, (total, count)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    srv.engine.block_manager.check_integrity()

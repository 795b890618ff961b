"""A fake OpenAI-style streaming server (for the load generator's own tests)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def fake_openai_app(mode: str) -> FastAPI:
    """A streaming ``/v1/completions`` that answers ``max_tokens`` one-word chunks.

    Modes: ``ok``; ``errors`` (every 3rd request a 500, every 5th a 429); ``slow`` (never
    finishes in time); ``truncated`` (stream cut before ``[DONE]``).
    """
    app = FastAPI()
    counter = itertools.count(1)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        body = await request.json()
        n = next(counter)
        if mode == "errors" and n % 3 == 0:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "errors" and n % 5 == 0:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429)
        usage = (body.get("stream_options") or {}).get("include_usage", False)
        tokens = int(body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            for i in range(tokens):
                if mode == "slow":
                    await asyncio.sleep(5)
                last = i == tokens - 1
                if mode == "truncated" and last:
                    return
                choice = {"index": 0, "text": f" w{i}", "finish_reason": "length" if last else None}
                chunk = {"id": f"cmpl-{n}", "object": "text_completion", "choices": [choice]}
                if usage:
                    chunk["usage"] = None
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.001)
            if usage:
                u = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
                yield f"data: {json.dumps({'id': f'cmpl-{n}', 'choices': [], 'usage': u})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app

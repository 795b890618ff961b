"""``POST /v1/completions``: prompts (text, token ids, or lists of either) to completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from starlette.responses import Response

from carpool.outputs import TokenLogprobs
from carpool.server.errors import APIError
from carpool.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    dump,
)
from carpool.server.serving import Job, OpenAIServing, finite_logprob
from carpool.server.streaming import SSEResponse, final_response, sse


class CompletionServing(OpenAIServing):
    """The completions endpoint over an ``EngineClient``."""

    async def create_completion(self, req: CompletionRequest, request: Request) -> Response:
        """``POST /v1/completions`` (streaming or not)."""
        arrival = self.client.clock()
        self.check_model(req.model)
        self.check_request(req)
        self.check_num_seqs(_num_prompts(req.prompt), req)
        prompts = await self._prompts(req)
        fields = ("prompt", "max_tokens")
        params = [
            self.params(req, len(ids), req.max_tokens, fields, req.logprobs) for ids in prompts
        ]
        await self.prepare(params[0])  # every prompt shares the request's constraint
        echoes = await self._echoes(req, prompts)
        job = self.start("cmpl", prompts, params, req.timeout, arrival)
        if req.stream:
            events = self.event_stream(job, self._stream(req, job, req.include_usage, echoes))
            return SSEResponse(events, job.abort_all, job.streams, self.max_stream_backlog)
        outs = await self.collect(request, job)
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                lp = self._logprobs(c.logprobs or [], 0) if req.logprobs is not None else None
                choices.append(
                    CompletionChoice(
                        index=i * req.n + c.index,
                        text=echoes[i] + c.text,
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                    )
                )
        return final_response(CompletionResponse, job, self.model_name, choices)

    async def _echoes(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text when ``echo`` asks for it (the text sent, or decoded ids)."""
        if not req.echo:
            return [""] * len(prompts)
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], str):
            return list(p)  # type: ignore[arg-type]
        return await asyncio.to_thread(lambda: [self.tokenizer.decode(ids) for ids in prompts])

    async def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list[str] | None = [p]
        elif not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        elif isinstance(p[0], str):
            texts = list(p)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            for i, t in enumerate(texts):
                if not t:  # refused as the engine refuses "" (it would be a lone BOS)
                    where = "prompt" if isinstance(p, str) else f"prompt[{i}]"
                    raise APIError(
                        400, f"{where}: must not be empty (at least one character)", param="prompt"
                    )
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts])
        elif isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        for i, ids in enumerate(prompts):
            self.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        return prompts

    def _logprobs(self, lps: Sequence[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            tok = self.token(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(finite_logprob(lp.logprob))
            out.top_logprobs.append({self.token(t): finite_logprob(v) for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    async def _stream(
        self, req: CompletionRequest, job: Job, include_usage: bool, echoes: list[str]
    ) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        async for i, c in self.deltas(job):
            index = i * req.n + c.index
            text = c.delta_text
            if index not in echoed:  # the prompt rides on each choice's first chunk
                echoed.add(index)
                text = echoes[i] + text
            lp = None
            if req.logprobs is not None:
                lp = self._logprobs(c.logprobs or [], offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
            choice = CompletionChoice(
                index=index, text=text, logprobs=lp, finish_reason=c.finish_reason
            )
            resp = CompletionResponse(
                id=job.rid, created=job.created, model=self.model_name, choices=[choice]
            )
            yield sse(dump(resp) | {"usage": None})
        if include_usage:
            yield sse(
                {
                    "id": job.rid,
                    "object": "text_completion",
                    "created": job.created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": dump(job.usage()),
                }
            )


def _num_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts ``prompt`` holds (a text, texts, one list of ids, lists of ids)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)

"""``POST /v1/chat/completions``: a conversation, rendered with the model's chat template."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from starlette.responses import Response

from carpool.errors import InvalidRequestError
from carpool.outputs import TokenLogprobs
from carpool.server.errors import APIError
from carpool.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    dump,
)
from carpool.server.serving import Job, OpenAIServing, json_response
from carpool.server.streaming import SSEResponse, sse


class ChatServing(OpenAIServing):
    """The chat endpoint over an ``EngineClient``."""

    async def create_chat_completion(
        self, req: ChatCompletionRequest, request: Request
    ) -> Response:
        """``POST /v1/chat/completions`` (streaming or not)."""
        arrival = self.client.clock()
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await asyncio.to_thread(
                self.tokenizer.apply_chat_template,
                messages,
                add_generation_prompt=True,
                tokenize=True,
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="messages") from None
        assert isinstance(ids, list)
        if not ids:
            raise APIError(400, "messages: the rendered prompt is empty", param="messages")
        field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self.params(req, len(ids), max_tokens, ("messages", field_name), logprobs)
        job = Job(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), [ids], [params])
        self.submit(job, req.timeout, arrival)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self.event_stream(job, self._stream(req, job, include_usage))
            return SSEResponse(events, job.abort_all)
        outs = await self.collect(request, job)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(c.logprobs or []) if req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in outs[0].outputs
        ]
        resp = ChatCompletionResponse(
            id=job.rid,
            created=job.created,
            model=self.model_name,
            choices=choices,
            usage=job.usage(),
        )
        return json_response(dump(resp))

    def _logprobs(self, lps: Sequence[TokenLogprobs]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            tok = self.token(token_id)
            return TopLogprob(token=tok, logprob=logprob, bytes=list(tok.encode()))

        content = []
        for lp in lps:
            t = top(lp.token_id, lp.logprob)
            content.append(
                ChatTokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=t.bytes,
                    top_logprobs=[top(i, v) for i, v in lp.top],
                )
            )
        return ChatLogprobs(content=content)

    async def _stream(
        self, req: ChatCompletionRequest, job: Job, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice]) -> str:
            data = dump(
                ChatCompletionChunk(
                    id=job.rid, created=job.created, model=self.model_name, choices=choices
                )
            )
            for choice in data["choices"]:  # OpenAI leaves unset delta fields out
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            if not include_usage:
                data.pop("usage")
            return sse(data)

        yield chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(req.n)
            ]
        )
        async for _, c in self.deltas(job):
            lp = self._logprobs(c.logprobs or []) if req.logprobs else None
            yield chunk(
                [
                    ChatChunkChoice(
                        index=c.index,
                        delta=DeltaMessage(content=c.delta_text or None),
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                    )
                ]
            )
        if include_usage:
            data = dump(
                ChatCompletionChunk(
                    id=job.rid,
                    created=job.created,
                    model=self.model_name,
                    choices=[],
                    usage=job.usage(),
                )
            )
            yield sse(data)

"""``POST /v1/chat/completions``: a conversation, rendered with the model's chat template."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

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
from carpool.server.serving import Job, OpenAIServing, finite_logprob
from carpool.server.streaming import SSEResponse, final_response, sse
from carpool.server.tool_stream import ToolCallStreamer, ToolPlan, tool_message
from carpool.tools.choice import forced_call_constraint
from carpool.tools.parsers import HermesParser, ToolParser


class ChatServing(OpenAIServing):
    """The chat endpoint over an ``EngineClient``."""

    tool_parser: ToolParser = HermesParser()  # set from the template / --tool-call-parser

    async def create_chat_completion(
        self, req: ChatCompletionRequest, request: Request
    ) -> Response:
        """``POST /v1/chat/completions`` (streaming or not)."""
        arrival = self.client.clock()
        self.check_model(req.model)
        self.check_request(req)
        self.check_num_seqs(1, req)
        plan = self._tool_plan(req)
        messages = [m.to_template() for m in req.messages]
        extra: dict[str, Any] = {"tools": plan.tools} if plan.tools else {}
        try:
            ids = await asyncio.to_thread(
                self.tokenizer.apply_chat_template,
                messages,
                add_generation_prompt=True,
                tokenize=True,
                **extra,
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
        if plan.constraint is not None:
            if params.structured_outputs is not None:
                raise APIError(
                    400,
                    "tool_choice required or named cannot be combined with another"
                    f" structured output constraint ({params.structured_outputs.param})",
                    param="tool_choice",
                )
            params = dataclasses.replace(params, structured_outputs=plan.constraint)
        await self.prepare(params)
        job = self.start("chatcmpl", [ids], [params], req.timeout, arrival)
        if req.stream:
            events = self.event_stream(job, self._stream(req, job, req.include_usage, plan))
            return SSEResponse(events, job.abort_all, job.streams, self.max_stream_backlog)
        outs = await self.collect(request, job)
        choices = []
        for c in outs[0].outputs:
            content, calls = tool_message(plan, c.text)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=content, tool_calls=calls or None),
                    logprobs=self._logprobs(c.logprobs or []) if req.logprobs else None,
                    finish_reason=finish,
                )
            )
        return final_response(ChatCompletionResponse, job, self.model_name, choices)

    def _tool_plan(self, req: ChatCompletionRequest) -> ToolPlan:
        """What the request's tools mean: rendered or not, forced or parsed (``auto``)."""
        choice: str | dict[str, Any] = "none"
        if req.tools:
            tc = req.tool_choice or "auto"
            choice = tc if isinstance(tc, str) else tc.model_dump(mode="json")
        if choice == "none":
            return ToolPlan(None, "none", None, self.tool_parser)
        tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools or []]
        try:
            constraint = forced_call_constraint(tools, choice, req.parallel_tool_calls)
        except InvalidRequestError as e:
            raise APIError(400, f"tools: {e.message}", param="tools") from None
        return ToolPlan(tools, choice, constraint, self.tool_parser)

    def _logprobs(self, lps: Sequence[TokenLogprobs]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            tok = self.token(token_id)
            lp = finite_logprob(logprob)
            return TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))

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
        self, req: ChatCompletionRequest, job: Job, include_usage: bool, plan: ToolPlan
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
        streamers = [ToolCallStreamer(plan) for _ in range(req.n)]
        async for _, c in self.deltas(job):
            lp = self._logprobs(c.logprobs or []) if req.logprobs else None
            st = streamers[c.index]
            content, calls = st.feed(c.delta_text, c.finished)
            finish = c.finish_reason
            if finish == "stop" and st.called:
                finish = "tool_calls"
            yield chunk(
                [
                    ChatChunkChoice(
                        index=c.index,
                        delta=DeltaMessage(content=content or None, tool_calls=calls or None),
                        logprobs=lp,
                        finish_reason=finish,
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

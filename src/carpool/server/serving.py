"""The OpenAI endpoints' logic: request -> prompts and ``SamplingParams`` -> engine -> response.

Everything that can be checked on the HTTP side is checked before a request reaches the engine
(types, ranges, context length, cache capacity), so a bad request costs the engine nothing and
a streaming response only starts once the request is known to be servable.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import JSONResponse, Response

from carpool.engine.async_engine import (
    AsyncEngine,
    EngineStoppedError,
    QueueFullError,
    RequestStream,
    RequestTimeoutError,
)
from carpool.errors import CarpoolError, EngineDeadError, InvalidRequestError
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.sampling_params import SamplingParams
from carpool.server.errors import APIError
from carpool.server.metrics import ServerMetrics
from carpool.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    SamplingFields,
    TopLogprob,
    UsageInfo,
    dump,
)
from carpool.server.streaming import SSEResponse, merge_streams, run_unless_disconnected, sse
from carpool.tokenizer import Tokenizer
from carpool.worker.sampler import TokenLogprobs

logger = logging.getLogger("carpool.server")
T = TypeVar("T")


def engine_error_to_api(e: BaseException, retry_after: int = 1) -> APIError:
    """Map an engine-side exception to the HTTP error the client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(
            429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)}
        )
    if isinstance(e, RequestTimeoutError):
        return APIError(504, str(e), code="request_timeout")
    if isinstance(e, EngineStoppedError):  # a subclass may name its own code (a replica down)
        code = getattr(e, "code", "shutting_down")
        return APIError(503, str(e), code=code, headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), code="engine_dead")
    if isinstance(e, InvalidRequestError):
        m = re.match(r"(?:request \S+: )?(?:prompt token ids|the prompt|prompt)\b", str(e))
        param = "prompt" if m else _param_of(str(e))
        return APIError(400, str(e), param=param)
    if isinstance(e, CarpoolError):
        return APIError(500, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _param_of(message: str) -> str | None:
    m = re.match(r"([a-z_]+) (must|strings)", message)
    return m.group(1) if m else None


@dataclass
class _Job:
    """One HTTP request: its prompts, their engine streams and what came back."""

    rid: str
    created: int
    prompts: list[list[int]]
    params: list[SamplingParams]
    streams: list[RequestStream] = field(default_factory=list)

    def abort_all(self) -> None:
        for s in self.streams:
            s.abort()


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses.

    Args:
        engine: the running async engine.
        model_name: the served model name (requests naming another model get a 404).
        retry_after: seconds suggested in ``Retry-After`` of a 429.
        metrics: counts the requests refused with 429.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        retry_after: int = 1,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.retry_after = retry_after
        llm = engine.engine
        self.tokenizer: Tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model_config.vocab_size
        self.num_blocks = llm.num_blocks
        self.block_manager = llm.block_manager
        self._token_text: dict[int, str] = {}

    # ---- shared checks ----------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _params(
        self,
        req: SamplingFields,
        prompt_len: int,
        max_tokens: int | None,
        max_tokens_field: str,
        logprobs: int | None,
    ) -> SamplingParams:
        if max_tokens is None:  # as much as fits in the context and the cache
            room = min(self.max_model_len, self.num_blocks * self.block_manager.block_size)
            max_tokens = max(1, room - prompt_len)
        total = prompt_len + max_tokens
        prompt_field = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        if total > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were requested ({prompt_len} in the prompt, {max_tokens} for the "
                f"completion); reduce the prompt or {max_tokens_field}",
                param=prompt_field if prompt_len >= self.max_model_len else max_tokens_field,
                code="context_length_exceeded",
            )
        blocks = self.block_manager.blocks_needed(total - 1)
        if blocks > self.num_blocks:
            raise APIError(
                400,
                f"{prompt_len} prompt tokens + {max_tokens_field}={max_tokens} need {blocks} KV "
                f"blocks but the whole cache has {self.num_blocks}; reduce {max_tokens_field}",
                param=max_tokens_field,
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                n=req.n,
                min_tokens=min(req.min_tokens, max_tokens),
                priority=req.priority,
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None

    def _submit(self, job: _Job, timeout: float | None, arrival: float) -> None:
        try:
            self.engine.check_capacity(len(job.prompts))
            for i, (ids, params) in enumerate(zip(job.prompts, job.params, strict=True)):
                job.streams.append(
                    self.engine.submit(ids, params, f"{job.rid}-{i}", timeout, arrival)
                )
        except CarpoolError as e:
            job.abort_all()
            if isinstance(e, QueueFullError) and self.metrics is not None:
                self.metrics.rejected.inc()
            raise engine_error_to_api(e, self.retry_after) from None

    async def _collect(self, request: Request, job: _Job) -> list[RequestOutput]:
        async def gather() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(job.streams)
            async for i, out in merge_streams(job.streams):
                if out.finished:
                    finals[i] = out
            return [f for f in finals if f is not None]

        try:
            outs = await run_unless_disconnected(request, gather())
        except CarpoolError as e:
            raise engine_error_to_api(e, self.retry_after) from None
        finally:
            job.abort_all()
        for out in outs:
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise APIError(500, c.error or "the engine failed the request")
        return outs

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    @staticmethod
    def _new_logprobs(c: CompletionOutput) -> list[TokenLogprobs]:
        if c.logprobs is None or not c.delta_token_ids:
            return []
        end = len(c.token_ids)
        return c.logprobs[end - len(c.delta_token_ids) : end]

    @staticmethod
    def _usage(job: _Job, outs: Sequence[RequestOutput]) -> UsageInfo:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outs)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    # ---- /v1/completions --------------------------------------------------------------------

    async def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
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
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts])
        elif isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        for i, ids in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise APIError(400, f"{where}: the prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"{where}: token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                    param="prompt",
                )
        return prompts

    async def create_completion(self, req: CompletionRequest, request: Request) -> Response:
        """``POST /v1/completions`` (streaming or not)."""
        arrival = self.engine.engine.clock()
        self.check_model(req.model)
        prompts = await self._completion_prompts(req)
        params = [
            self._params(req, len(ids), req.max_tokens, "max_tokens", req.logprobs)
            for ids in prompts
        ]
        job = _Job(f"cmpl-{uuid.uuid4().hex}", int(time.time()), prompts, params)
        self._submit(job, req.timeout, arrival)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._completion_stream(req, job, include_usage), job.abort_all)
        outs = await self._collect(request, job)
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                lp = (
                    self._completion_logprobs(c.logprobs or [], 0)
                    if req.logprobs is not None
                    else None
                )
                choices.append(
                    CompletionChoice(
                        index=i * req.n + c.index,
                        text=c.text,
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                    )
                )
        resp = CompletionResponse(
            id=job.rid,
            created=job.created,
            model=self.model_name,
            choices=choices,
            usage=self._usage(job, outs),
        )
        return _json(dump(resp))

    def _completion_logprobs(self, lps: Sequence[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            tok = self._token(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    async def _completion_stream(
        self, req: CompletionRequest, job: _Job, include_usage: bool
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        finished: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, out in merge_streams(job.streams):
                for c in out.outputs:
                    index = i * req.n + c.index
                    if index in finished:
                        continue
                    new_lps = self._new_logprobs(c)
                    if not (c.delta_text or c.finished or new_lps):
                        continue
                    if c.finish_reason == "error":
                        raise APIError(500, c.error or "the engine failed the request")
                    lp = None
                    if req.logprobs is not None:
                        lp = self._completion_logprobs(new_lps, offsets.get(index, 0))
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                    if c.finished:
                        finished.add(index)
                    choice = CompletionChoice(
                        index=index, text=c.delta_text, logprobs=lp, finish_reason=c.finish_reason
                    )
                    yield sse(
                        dump(
                            CompletionResponse(
                                id=job.rid,
                                created=job.created,
                                model=self.model_name,
                                choices=[choice],
                            )
                        )
                        | {"usage": None}
                    )
                if out.finished:
                    finals[i] = out
            if include_usage:
                usage = self._usage(job, list(finals.values()))
                yield sse(
                    {
                        "id": job.rid,
                        "object": "text_completion",
                        "created": job.created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": dump(usage),
                    }
                )
        except (CarpoolError, APIError) as e:
            err = engine_error_to_api(e, self.retry_after)
            logger.warning("stream %s ended with an error: %s", job.rid, err.message)
            yield sse(err.body())
        finally:
            job.abort_all()
        yield sse("[DONE]")

    # ---- /v1/chat/completions ---------------------------------------------------------------

    async def create_chat_completion(
        self, req: ChatCompletionRequest, request: Request
    ) -> Response:
        """``POST /v1/chat/completions`` (streaming or not)."""
        arrival = self.engine.engine.clock()
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
        params = self._params(
            req, len(ids), req.max_completion_tokens or req.max_tokens, field_name, logprobs
        )
        job = _Job(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), [ids], [params])
        self._submit(job, req.timeout, arrival)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._chat_stream(req, job, include_usage), job.abort_all)
        outs = await self._collect(request, job)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs or []) if req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in outs[0].outputs
        ]
        resp = ChatCompletionResponse(
            id=job.rid,
            created=job.created,
            model=self.model_name,
            choices=choices,
            usage=self._usage(job, outs),
        )
        return _json(dump(resp))

    def _chat_logprobs(self, lps: Sequence[TokenLogprobs]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            tok = self._token(token_id)
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

    async def _chat_stream(
        self, req: ChatCompletionRequest, job: _Job, include_usage: bool
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

        final: RequestOutput | None = None
        finished: set[int] = set()
        try:
            yield chunk(
                [
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in range(req.n)
                ]
            )
            async for _, out in merge_streams(job.streams):
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    new_lps = self._new_logprobs(c)
                    if not (c.delta_text or c.finished or new_lps):
                        continue
                    if c.finish_reason == "error":
                        raise APIError(500, c.error or "the engine failed the request")
                    if c.finished:
                        finished.add(c.index)
                    lp = self._chat_logprobs(new_lps) if req.logprobs else None
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
                if out.finished:
                    final = out
            if include_usage:
                usage = self._usage(job, [final] if final else [])
                data = dump(
                    ChatCompletionChunk(
                        id=job.rid,
                        created=job.created,
                        model=self.model_name,
                        choices=[],
                        usage=usage,
                    )
                )
                yield sse(data)
        except (CarpoolError, APIError) as e:
            err = engine_error_to_api(e, self.retry_after)
            logger.warning("stream %s ended with an error: %s", job.rid, err.message)
            yield sse(err.body())
        finally:
            job.abort_all()
        yield sse("[DONE]")


def _json(data: dict[str, Any]) -> Response:
    return JSONResponse(data)

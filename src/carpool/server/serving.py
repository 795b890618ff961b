"""What the OpenAI endpoints share: checks, submission, collection and the stream helper.

Everything that can be checked on the HTTP side is checked before a request reaches the engine
(types, ranges, context length, cache capacity: ``ModelLimits``, the engine's own checks), so a
bad request costs the engine nothing and a streaming response only starts once the request is
known to be servable. The server holds an ``EngineClient`` and nothing else of the engine.
Streams ask for DELTA outputs and non-streams for FINAL_ONLY, so no step copies what an earlier
step already sent. ``completions.py`` and ``chat.py`` build the two endpoints on this.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from carpool.engine.client import EngineClient, RequestStream
from carpool.errors import CarpoolError, InvalidRequestError, QueueFullError
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.sampling_params import RequestOutputKind, SamplingParams
from carpool.server.errors import APIError, error_to_api
from carpool.server.metrics import ServerMetrics
from carpool.server.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from carpool.server.streaming import merge_streams, run_unless_disconnected, sse

logger = logging.getLogger("carpool.server")


@dataclass
class Job:
    """One HTTP request: its prompts, their engine streams and the tokens generated."""

    rid: str
    created: int
    prompts: list[list[int]]
    params: list[SamplingParams]
    streams: list[RequestStream] = field(default_factory=list)
    num_tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # (prompt, choice)
    num_cached: dict[int, int] = field(default_factory=dict)  # prompt -> prefix-cache hits

    def abort_all(self) -> None:
        for s in self.streams:
            s.abort()

    def usage(self) -> UsageInfo:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(self.num_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.num_cached.values())),
        )


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses.

    Args:
        client: the engine (in-process or a replica pool).
        model_name: the served model name (requests naming another model get a 404).
        retry_after: seconds suggested in ``Retry-After`` of a 429.
        metrics: counts the requests refused with 429.
        max_seqs_per_request: most sequences (prompts x n) one request may ask for (400 above).
        max_stream_backlog: bytes of output a streaming client may leave unread before it is
            cut off (see ``SSEResponse``).
    """

    def __init__(
        self,
        client: EngineClient,
        model_name: str,
        retry_after: int = 1,
        metrics: ServerMetrics | None = None,
        max_seqs_per_request: int = 256,
        max_stream_backlog: int = 1 << 20,
    ) -> None:
        self.client = client
        self.max_seqs_per_request = max_seqs_per_request
        self.max_stream_backlog = max_stream_backlog
        self.metrics = metrics
        self.model_name = model_name
        self.retry_after = retry_after
        self.limits = client.limits
        self.tokenizer = client.tokenizer
        self._token_text: dict[int, str] = {}

    # ---- checks -----------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def params(
        self,
        req: SamplingFields,
        prompt_len: int,
        max_tokens: int | None,
        fields: tuple[str, str],
        logprobs: int | None,
    ) -> SamplingParams:
        """The request's ``SamplingParams``, after the context and cache checks.

        Args:
            fields: the names of the prompt and max-tokens fields (for ``param``).
        """
        if max_tokens is None:  # as much as fits in the context and the cache
            max_tokens = self.limits.default_max_tokens(prompt_len)
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        try:
            self.limits.check_length(prompt_len, max_tokens, *fields)
            return req.to_sampling_params(max_tokens, logprobs, kind)
        except CarpoolError as e:
            raise error_to_api(e) from None

    def check_num_seqs(self, num_prompts: int, req: SamplingFields) -> None:
        """400 when ``num_prompts`` x n is over ``max_seqs_per_request`` (checked before any
        tokenizing, so an oversized request costs the server nothing)."""
        num_seqs = num_prompts * req.n
        if num_seqs <= self.max_seqs_per_request:
            return
        raise APIError(
            400,
            f"this request asks for {num_prompts} prompt(s) x n={req.n} = {num_seqs} sequences;"
            f" this server takes at most {self.max_seqs_per_request} per request"
            " (--max-seqs-per-request): send fewer prompts or a smaller n",
            param="n" if req.n > 1 else "prompt",
        )

    def check_request(self, req: SamplingFields) -> None:
        """400 for fields that would change the result but are not implemented."""
        try:
            req.check_supported()
        except CarpoolError as e:
            raise error_to_api(e) from None

    async def prepare(self, params: SamplingParams) -> None:
        """Check ``logit_bias`` ids and compile the request's constraint in a worker thread.

        The grammar lands in the compiler's cache, so the engine thread, which compiles it
        again when the request arrives, finds it there and no other request's decode waits on
        a new schema. A constraint that does not compile is a 400 naming its field.
        """
        try:
            bad = [t for t, _ in params.logit_bias if t >= self.limits.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"logit_bias: token ids must be in [0, {self.limits.vocab_size}),"
                    f" got {bad[:5]}",
                    param="logit_bias",
                )
            if params.structured_outputs is not None:
                from carpool.structured.compiler import compiler_for

                so = params.structured_outputs
                await asyncio.to_thread(
                    lambda: compiler_for(self.tokenizer, self.limits.vocab_size).compile(so)
                )
        except CarpoolError as e:
            raise error_to_api(e) from None

    def check_prompt(self, ids: list[int], param: str) -> None:
        try:
            self.limits.check_prompt_ids(ids, param)
        except CarpoolError as e:
            raise error_to_api(e) from None

    # ---- submission and results -------------------------------------------------------------

    def start(
        self,
        prefix: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        timeout: float | None,
        arrival: float,
    ) -> Job:
        """A new ``Job`` (id ``{prefix}-{random hex}``, created now) with every prompt queued."""
        job = Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), prompts, params)
        self.submit(job, timeout, arrival)
        return job

    def submit(self, job: Job, timeout: float | None, arrival: float) -> None:
        """Queue every prompt of ``job`` (all or none)."""
        try:
            # --max-queue counts sequences: each of a prompt's n completions takes a seat.
            self.client.check_capacity(sum(p.n for p in job.params))
            for i, (ids, params) in enumerate(zip(job.prompts, job.params, strict=True)):
                job.streams.append(
                    self.client.submit(ids, params, f"{job.rid}-{i}", timeout, arrival)
                )
        except CarpoolError as e:
            job.abort_all()
            if isinstance(e, QueueFullError) and self.metrics is not None:
                self.metrics.rejected.inc()
            raise error_to_api(e, self.retry_after) from None

    async def collect(self, request: Request, job: Job) -> list[RequestOutput]:
        """Every prompt's final output (non-streaming); 499 when the client leaves."""

        async def gather() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(job.streams)
            async for i, out in merge_streams(job.streams):
                if out.finished:
                    finals[i] = out
            return [f for f in finals if f is not None]

        try:
            outs = await run_unless_disconnected(request, gather())
        except CarpoolError as e:
            raise error_to_api(e, self.retry_after) from None
        finally:
            job.abort_all()
        for i, out in enumerate(outs):
            job.num_cached[i] = out.num_cached_tokens
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise APIError(500, c.error or "the engine failed the request")
                job.num_tokens[i, c.index] = c.num_tokens
        return outs

    async def deltas(self, job: Job) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """The shared stream helper: each choice's news as it comes, ``(prompt index, delta)``.

        Skips outputs with nothing to send and choices already finished; a choice that ended
        with an engine error raises ``APIError(500)``.
        """
        finished: set[tuple[int, int]] = set()
        async for i, out in merge_streams(job.streams):
            job.num_cached[i] = out.num_cached_tokens
            for c in out.outputs:
                key = (i, c.index)
                if key in finished:
                    continue
                job.num_tokens[key] = c.num_tokens
                if not (c.delta_text or c.finished or c.logprobs):
                    continue
                if c.finish_reason == "error":
                    raise APIError(500, c.error or "the engine failed the request")
                if c.finished:
                    finished.add(key)
                yield i, c

    async def event_stream(self, job: Job, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events`` as server-sent events; an error becomes an error event; then [DONE]."""
        try:
            async for event in events:
                yield event
        except (CarpoolError, APIError) as e:
            err = error_to_api(e, self.retry_after)
            logger.warning("stream %s ended with an error: %s", job.rid, err.message)
            yield sse(err.body())
        finally:
            job.abort_all()
        yield sse("[DONE]")

    def token(self, token_id: int) -> str:
        """A token's text, cached (logprobs name every top token)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text


def finite_logprob(value: float) -> float:
    """A logprob JSON can carry: a token a constraint masked out has -inf, sent as -9999.0
    (vLLM's value), since JSON has no infinity."""
    return max(value, -9999.0)


def json_response(data: dict[str, Any]) -> Response:
    return JSONResponse(data)

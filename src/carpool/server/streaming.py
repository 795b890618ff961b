"""Streaming plumbing of the HTTP side: server-sent events, disconnect watching, fan-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from carpool.engine.stream import RequestStream
from carpool.outputs import RequestOutput
from carpool.server.errors import APIError

T = TypeVar("T")


class SSEResponse(StreamingResponse):
    """A streaming response that aborts its requests however the stream ends.

    Starlette may never start the body iterator (the client left before the first byte), so
    the cleanup cannot live in the iterator's ``finally`` alone.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``APIError(499)``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise APIError(499, "client disconnected", code="client_closed_request")


async def merge_streams(
    streams: Sequence[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001  (handed to the consumer)
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class FinishedJob(Protocol):
    """What a final response says of its HTTP request (``serving.Job`` has it)."""

    rid: str
    created: int

    def usage(self) -> BaseModel:
        """Token counts of every prompt and completion of the request."""


def final_response(
    response: Callable[..., BaseModel], job: FinishedJob, model: str, choices: list[Any]
) -> JSONResponse:
    """The non-streaming body of a finished request, chat and completions alike: the
    ``response`` model with the job's id, creation time, usage, the model name and ``choices``."""
    body = response(
        id=job.rid, created=job.created, model=model, choices=choices, usage=job.usage()
    )
    return JSONResponse(body.model_dump(mode="json"))

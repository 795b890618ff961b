"""Streaming plumbing of the HTTP side: server-sent events, disconnect watching, fan-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
logger = logging.getLogger("carpool.server")


class SSEResponse(StreamingResponse):
    """A streaming response that aborts its requests however the stream ends.

    Starlette may never start the body iterator (the client left before the first byte), so
    the cleanup cannot live in the iterator's ``finally`` alone.

    It also bounds what a slow client costs: each of ``streams`` may hold at most
    ``max_backlog`` bytes of undelivered output. A client further behind is cut off (see
    ``RequestStream``): its request is aborted at once and the body's next event is the error
    event. When even that cannot be sent within ``CUT_OFF_GRACE`` seconds (the client reads
    nothing, the socket is full), the response is abandoned: uvicorn closes the connection.
    """

    CUT_OFF_GRACE = 2.0

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], None],
        streams: Sequence[RequestStream] = (),
        max_backlog: int | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._streams = streams
        for s in streams:
            s.max_backlog = max_backlog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not self._streams:
                await super().__call__(scope, receive, send)
                return
            body = asyncio.ensure_future(super().__call__(scope, receive, send))
            watch = asyncio.ensure_future(self._cut_off_for_good())
            try:
                await asyncio.wait({body, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                if not body.done():  # cut off, and the error event could not be sent
                    body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body
        finally:
            self._on_close()

    async def _cut_off_for_good(self) -> None:
        waits = [asyncio.ensure_future(s.cut_off.wait()) for s in self._streams]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        await asyncio.sleep(self.CUT_OFF_GRACE)
        logger.warning(
            "request %s: the client read nothing for %ss after its cut-off: closing its connection",
            ",".join(s.request_id for s in self._streams if s.cut_off.is_set()),
            self.CUT_OFF_GRACE,
        )


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
    # Bounded: a pump waits while the consumer is behind, so what is not consumed yet stays
    # in each stream, counted against its ``max_backlog``, not in this queue.
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue(
        maxsize=len(streams)
    )

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as e:  # noqa: BLE001  (handed to the consumer)
            await queue.put((i, e))

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

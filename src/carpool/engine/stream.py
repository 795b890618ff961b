"""``RequestStream``: the event-loop end of one submitted request, for every engine client.

``AsyncEngine`` feeds it from its engine thread, ``ReplicaPool`` from the event loop itself;
``put`` works from either. Iterate it for the request's outputs; an error ends it by raising.

The engine never waits for a consumer, so what a slow consumer has not taken yet piles up here.
``max_backlog`` bounds it: the outputs waiting are sized as the bytes of the events they will
become (``backlog_bytes``), and a consumer that falls further behind is cut off: what waits is
dropped, the request is aborted in the engine (its KV blocks freed within one step), and the
consumer's next read raises ``StreamBacklogError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from carpool.errors import CarpoolError
from carpool.outputs import RequestOutput

logger = logging.getLogger("carpool.engine")

# Rough bytes of one server-sent event's envelope (id, object, model, choice, finish_reason)
# and of one token or top logprob in it (its text and the number as JSON).
_EVENT_BYTES = 160
_TOKEN_BYTES = 32


class StreamBacklogError(CarpoolError):
    """The consumer of a stream fell more than ``max_backlog`` bytes behind; the request was
    aborted and what waited for it dropped."""

    status = 408
    default_code = "stream_backlog_exceeded"


def backlog_bytes(out: RequestOutput) -> int:
    """What ``out`` will weigh as a server-sent event, roughly (text, tokens, logprobs).

    A DELTA output holds only the step's news, so a stream's total is the size of the stream;
    the Python objects waiting take a few times more memory than this (measured ~3x with
    ``logprobs=20``), which the bound's default allows for.
    """
    size = _EVENT_BYTES
    for c in out.outputs:
        size += _EVENT_BYTES + len(c.delta_text) + _TOKEN_BYTES * len(c.delta_token_ids)
        if c.logprobs:
            size += _TOKEN_BYTES * sum(1 + len(lp.top) for lp in c.logprobs)
    return size


class RequestStream:
    """The outputs of one request, as they come.

    Made by an engine client's ``submit`` on a running event loop. Whoever submits owns the
    request: if it stops iterating before ``finished``, it must call ``abort()`` (idempotent),
    or the request runs to its end.

    Attributes:
        request_id: the request.
        received: outputs handed over so far (a replica pool retries a request elsewhere only
            while it received none).
        finished: the last output (or an error) was consumed, or the stream was aborted.
        backlog: estimated bytes of the outputs put but not yet consumed.
        max_backlog: the bound on ``backlog`` (None: unbounded; set by the consumer).
        cut_off: set once the consumer fell behind ``max_backlog`` and the request was aborted.
    """

    def __init__(self, request_id: str, on_abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.received = 0
        self.finished = False
        self.backlog = 0
        self.max_backlog: int | None = None
        self.cut_off = asyncio.Event()
        self._on_abort = on_abort
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue[tuple[RequestOutput | BaseException, int]] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand ``item`` to the consumer (from any thread)."""
        if isinstance(item, RequestOutput):
            self.received += 1
        if threading.get_ident() == self._loop_thread:
            self._enqueue(item)
            return
        # RuntimeError: the consumer's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._enqueue, item)

    def _enqueue(self, item: RequestOutput | BaseException) -> None:
        """Queue ``item`` (on the loop), or cut the consumer off when it is too far behind."""
        if self.cut_off.is_set():
            return  # the request was aborted: its last outputs have nobody to go to
        size = backlog_bytes(item) if isinstance(item, RequestOutput) else 0
        self.backlog += size
        if self.max_backlog is not None and self.backlog > self.max_backlog:
            self._cut(self.backlog)
            return
        self._queue.put_nowait((item, size))

    def _cut(self, backlog: int) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self.backlog = 0
        self.cut_off.set()
        logger.warning(
            "request %s: the client fell %d bytes behind its stream (limit %d); "
            "request aborted, connection to be closed",
            self.request_id,
            backlog,
            self.max_backlog,
        )
        message = (
            f"the client read the stream too slowly: more than {self.max_backlog} bytes were "
            "waiting for it; the request was aborted"
        )
        self._queue.put_nowait((StreamBacklogError(message), 0))
        self._on_abort(self.request_id)  # not ``abort()``: the consumer must still see the error

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item, size = await self._queue.get()
            self.backlog -= size
            if isinstance(item, BaseException):
                self.finished = True  # the engine already dropped the request
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        """Abort the request unless it finished (frees its KV blocks within one step)."""
        if not self.finished:
            self.finished = True
            if not self.cut_off.is_set():  # a cut-off aborted it already
                self._on_abort(self.request_id)

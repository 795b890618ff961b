"""``RequestStream``: the event-loop end of one submitted request, for every engine client.

``AsyncEngine`` feeds it from its engine thread, ``ReplicaPool`` from the event loop itself;
``put`` works from either. Iterate it for the request's outputs; an error ends it by raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from carpool.outputs import RequestOutput


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
    """

    def __init__(self, request_id: str, on_abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.received = 0
        self.finished = False
        self._on_abort = on_abort
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand ``item`` to the consumer (from any thread)."""
        if isinstance(item, RequestOutput):
            self.received += 1
        if threading.get_ident() == self._loop_thread:
            self._queue.put_nowait(item)
            return
        # RuntimeError: the consumer's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True  # the engine already dropped the request
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        """Abort the request unless it finished (frees its KV blocks within one step)."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)

"""The event-loop end of a request served by a replica, and the errors it can end with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from carpool.engine.async_engine import EngineStoppedError, RequestTimeoutError
from carpool.errors import CarpoolError, InvalidRequestError
from carpool.outputs import RequestOutput
from carpool.replicas.messages import FailureKind, RequestFailed, SubmitRequest


class ReplicaUnavailableError(EngineStoppedError):
    """No replica can take the request now (all down or restarting), or the replica serving
    it died after it had sent tokens. Reported as 503 with ``Retry-After``."""

    code = "replica_unavailable"


def failure_to_error(f: RequestFailed) -> CarpoolError:
    """The exception a ``RequestFailed`` report stands for (as ``AsyncEngine`` raises it)."""
    if f.kind is FailureKind.INVALID:
        return InvalidRequestError(f.message)
    if f.kind is FailureKind.TIMEOUT:
        return RequestTimeoutError(f.message)
    if f.kind is FailureKind.STOPPED:
        return EngineStoppedError(f.message)
    return CarpoolError(f.message)


class RemoteStream:
    """Iterate it for the request's outputs, as ``AsyncEngine``'s ``RequestStream``.

    Made by ``ReplicaPool.submit``; only touched on the event loop. Whoever submits owns the
    request: if it stops iterating before ``finished``, it must call ``abort()`` (idempotent).

    Attributes:
        request_id, deadline, timeout: as submitted.
        submit: the message that started it (sent again when it is retried elsewhere).
        replica: the index of the replica serving it (-1 before dispatch).
        received: outputs received from the replica; a request that received none may be
            retried on another replica when its replica dies.
        attempts: replicas it was sent to.
    """

    def __init__(self, submit: SubmitRequest, on_abort: Callable[[str], None]) -> None:
        self.submit = submit
        self.request_id = submit.request_id
        self.deadline = submit.deadline
        self.timeout = submit.timeout
        self.replica = -1
        self.received = 0
        self.attempts = 0
        self.finished = False
        self._on_abort = on_abort
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand ``item`` to the consumer (on the event loop)."""
        if isinstance(item, RequestOutput):
            self.received += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True  # the pool already dropped the request
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        """Abort the request unless it finished (the replica frees its KV within one step)."""
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)

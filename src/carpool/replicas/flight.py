"""``Flight``: a request in flight on some replica, and its front-end deadline.

The replica holds the request's deadline too (``NewRequest.deadline``, on the same system-wide
clock) and ends the request itself when it runs; the front end's timer is for when it does
not (hung, stopped, in one very long step), so a ``timeout`` holds whatever the replica does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from carpool.engine.core import NewRequest
from carpool.engine.stream import RequestStream
from carpool.errors import RequestTimeoutError

# The front end's deadline fires this long after the replica's own: a live replica ends its
# request itself (freeing its blocks and reporting a timeout in the same step).
DEADLINE_GRACE = 0.2


@dataclass
class Flight:
    """A request in flight on some replica (what a retry elsewhere needs).

    Attributes:
        stream: the request's stream (the client's end).
        submit: the message that started it (sent again on a retry).
        replica: the replica serving it now.
        attempts: replicas it was sent to.
        timer: the front end's deadline, while armed.
    """

    stream: RequestStream
    submit: NewRequest
    replica: int = -1
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    def arm(self, on_expire: Callable[[Flight], None]) -> None:
        """Call ``on_expire(self)`` a grace after the deadline (no-op without one)."""
        if self.submit.timeout is not None:
            delay = self.submit.timeout + DEADLINE_GRACE  # the deadline is submit time + this
            self.timer = asyncio.get_running_loop().call_later(delay, on_expire, self)

    def disarm(self) -> None:
        """The request ended: its deadline no longer applies."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timeout_error(self) -> RequestTimeoutError:
        """The error the replica's own deadline would have ended the request with."""
        return RequestTimeoutError(
            f"request {self.request_id} timed out: not finished within its "
            f"{self.submit.timeout or 0:g} s deadline"
        )

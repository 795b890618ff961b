"""The HTTP/1.1 connection: uvicorn's httptools protocol with deadlines, limits, JSON refusals.

uvicorn bounds only the idle time between two requests of a keep-alive connection
(``timeout_keep_alive``). A client that connects and sends nothing, stops halfway through its
headers, or announces a body it never sends holds a connection (a file descriptor) for good,
and a few hundred of them lock everyone out. This protocol adds, per connection:

- a **header deadline** (``header_timeout``): the request line and headers must be complete
  within it, counted from the connection (or from the first byte of a later keep-alive
  request). A connection that sent nothing is closed without a word; one that sent part of a
  request gets 408;
- a **body deadline** (``body_timeout``): the whole body must arrive within it once the headers
  did (a deadline for the whole body, not per read as nginx's ``client_body_timeout``, so that
  a client trickling a byte a second cannot hold the connection either); 408 when the app has
  not answered yet, else the connection is closed once the answer is complete;
- **header limits**: more than ``max_header_count`` headers, or a request line plus headers
  over ``max_header_bytes`` (counted as they arrive, so an endless header is cut early), 431;
- a **connection cap**: a connection opened while ``max_connections`` are open is answered
  503 with ``Retry-After`` at once, before its request is read, and closed. uvicorn's own
  ``limit_concurrency`` answers ``text/plain``, and only once a request's headers arrived;
- **malformed HTTP** (what the parser refuses) gets 400.

Every refusal is an OpenAI-style JSON error (``error.request_id`` and ``X-Request-Id`` as from
the app), sent with ``Connection: close``. After a timeout the connection is closed at once
(the client stalled; its descriptor is what must be freed); after another refusal it is
half-closed and what the client still sends is read and dropped for at most
``LINGER_SECONDS`` (a plain close with unread input would reset the connection and could
destroy the answer before the client reads it).

Why here and not in the ASGI app: the header phase happens before the app exists; a timeout
around body reads in the app would only cover routes that read a body and would leave the
socket open after answering; the protocol sees every byte, frees the descriptor, and covers
every route (404s and the API-key guard included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from carpool.server.config import ServerConfig
from carpool.server.errors import BODY_TIMEOUT_MARK, APIError

logger = logging.getLogger("carpool.access")
# How long a refused connection is read (and the input dropped) after its answer before it is
# closed; a client that closes first ends it sooner.
LINGER_SECONDS = 2.0


def default_max_connections() -> int:
    """Half the process's soft open-file limit (the rest: model files, pipes, replicas)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 512
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft // 2)


@dataclass(frozen=True)
class ConnectionLimits:
    """What every connection is held to (see the module docstring)."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    max_header_bytes: int
    max_header_count: int
    retry_after: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> ConnectionLimits:
        """The limits a ``ServerConfig`` asks for (``max_connections`` None: the default)."""
        return cls(
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            max_connections=config.max_connections or default_max_connections(),
            max_header_bytes=config.max_header_bytes,
            max_header_count=config.max_header_count,
            retry_after=config.retry_after,
        )


def protocol_class(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``), bound to ``limits``.

    uvicorn builds one protocol per connection from the class alone, so the limits travel as a
    class attribute of a subclass made for them.
    """
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal is in ``_refusal``."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with deadlines, header limits, a connection cap and JSON refusals.

    Use ``protocol_class(limits)``; this base has no limits of its own.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reading_header = False  # from the connection / a request's first byte to its end
        self._message_begun = False  # a request's first byte arrived (and it is not complete)
        self._header_raw = 0  # bytes received while reading the header
        self._header_size = 0  # request line plus headers, as parsed
        self._header_count = 0
        self._started = time.perf_counter()
        self._refusal: APIError | None = None
        self._lingering = False

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Refused before its request is read, so that a flood of connections that send
            # nothing is shed in LINGER_SECONDS, not held until the header timeout.
            self._refuse(
                APIError(
                    503,
                    f"too many open connections (the server's limit is "
                    f"{self.limits.max_connections}); retry later",
                    code="too_many_connections",
                    headers={"Retry-After": str(self.limits.retry_after)},
                )
            )
            return
        self._start_header()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Graceful shutdown: a refused connection closes now, others as uvicorn decides."""
        if self._lingering:
            self.transport.close()
            return
        super().shutdown()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timers()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # a refused connection: its input is dropped until it closes
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn: a WebSocket or an ignored upgrade
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as e:
            refusal = self._refusal or APIError(
                400, f"malformed HTTP request: {e}", code="invalid_http_request"
            )
            self._refuse(refusal)
            return
        if self._reading_header and self._message_begun:
            self._header_raw += len(data)
            if self._header_raw > self.limits.max_header_bytes:
                self._refuse(self._headers_too_large())

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, as the JSON refusal (kept for any caller in uvicorn)."""
        self._refuse(APIError(400, f"malformed HTTP request: {msg}", code="invalid_http_request"))

    # -- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun = True
        self._header_raw = self._header_size = self._header_count = 0
        if not self._reading_header:  # a later request on a keep-alive connection
            self._start_header()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_size += len(url)
        if self._header_size > self.limits.max_header_bytes:
            self._stop(self._headers_too_large())

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_header_count:
            self._stop(
                APIError(
                    431,
                    f"more than {self.limits.max_header_count} request headers",
                    code="request_header_fields_too_large",
                )
            )
        if self._header_size > self.limits.max_header_bytes:
            self._stop(self._headers_too_large())

    def on_headers_complete(self) -> None:
        self._reading_header = False
        self._cancel(self._header_timer)
        self._header_timer = None
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_begun = False
        self._cancel(self._body_timer)
        self._body_timer = None

    # -- deadlines ----------------------------------------------------------------------------
    def _start_header(self) -> None:
        self._reading_header = True
        self._started = time.perf_counter()
        self._cancel(self._header_timer)
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout, self._header_timed_out
        )

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading (pipelining): not the client's
            self._start_header()
            return
        if not self._message_begun:  # nothing asked, nothing to answer
            self._log(None, "-", "closed: nothing sent within the header timeout")
            self.transport.close()
            return
        self._refuse(
            APIError(
                408,
                f"the request line and headers did not arrive within "
                f"{self.limits.header_timeout:g}s",
                code="request_timeout",
            ),
            linger=False,
        )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading (the app is behind): wait again
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()  # answered already (e.g. 401 before the body): just close
            return
        if cycle.response_started:  # an answer is on its way: let it finish, then close
            cycle.keep_alive = False
            return
        # The mark tells the app's error handler that this is the timeout, logged here, not a
        # hang-up.
        state = cycle.scope.setdefault("state", {})
        state[BODY_TIMEOUT_MARK] = True
        self._refuse(
            APIError(
                408,
                f"the request body did not arrive within {self.limits.body_timeout:g}s",
                code="request_timeout",
            ),
            request_id=state.get("request_id"),
            linger=False,
        )

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            self._cancel(timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    # -- refusals -----------------------------------------------------------------------------
    def _headers_too_large(self) -> APIError:
        return APIError(
            431,
            f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
            code="request_header_fields_too_large",
        )

    def _stop(self, error: APIError) -> None:
        """Stop the parser (from inside a callback); ``data_received`` sends ``error``."""
        self._refusal = error
        raise _Refused(error.message)

    def _refuse(self, error: APIError, request_id: str | None = None, linger: bool = True) -> None:
        """Answer ``error`` as JSON with ``Connection: close``, then linger and close.

        Args:
            error: the answer.
            request_id: the id the app gave the request, if it got that far (else a new one).
            linger: read and drop the client's input for a while before closing (for a client
                still sending); False after a timeout (the client stalled: its descriptor is
                freed at once).
        """
        if self._lingering or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()  # an answer is on its way: no second one in its middle
                return
            # The app is still reading the request: its receive() now says http.disconnect,
            # and what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self._lingering = True
        self._cancel_timers()
        self._unset_keepalive_if_required()
        rid = request_id or uuid.uuid4().hex
        body = error.body()
        body["error"]["request_id"] = rid
        payload = json.dumps(body).encode()
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", rid.encode()),
            *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
        ]
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(STATUS_LINE[error.status] + head + b"\r\n" + payload)
        self._log(error.status, rid, error.code or error.type)
        if not linger:
            self.transport.close()  # after the answer is written
        elif self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _log(self, status: int | None, rid: str, why: str) -> None:
        """One access-log line, in the format of ``AccessLogMiddleware``, plus the reason."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        scope: Any = self.scope or {}
        logger.info(
            '%s "%s %s" %s %.1fms request_id=%s (%s)',
            client,
            scope.get("method", "-"),
            scope.get("path", "-"),
            "-" if status is None else status,
            (time.perf_counter() - self._started) * 1e3,
            rid,
            why,
        )

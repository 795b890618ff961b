"""One access log line per request, and a request id on every response.

``AccessLogMiddleware`` is the outermost ASGI layer, so it sees every answer (4xx from the
guards and validation included):

- the id is the client's ``X-Request-Id`` when it sends a sane one (letters, digits, ``._:-``,
  at most 128), else a new random one; it goes back in the ``X-Request-Id`` response header,
  into ``error.request_id`` of every JSON error body, and into the log line;
- the line (logger ``carpool.access``): client, method, path, status, latency to the last
  body byte (a stream's whole duration), request id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("carpool.access")
HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(headers: Headers) -> str:
    """The client's ``X-Request-Id`` when sane, else a new one."""
    given = headers.get(HEADER, "")
    return given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex


def with_request_id(body: bytes, request_id: str) -> bytes:
    """``{"error": {...}}`` with ``request_id`` added; other bodies unchanged."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data["error"]["request_id"] = request_id
        return json.dumps(data).encode()
    return body


class AccessLogMiddleware:
    """Request id in, request id out, one log line per request (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(Headers(scope=scope))
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500  # an exception before any response is answered 500 by the server
        held: Message | None = None  # an error's start message, sent with its amended body
        chunks: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[HEADER] = rid
                if status >= 400 and headers.get("content-type", "").startswith("application/json"):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = with_request_id(b"".join(chunks), rid)
                MutableHeaders(scope=held)["content-length"] = str(len(body))
                await send(held)
                message = {"type": "http.response.body", "body": body, "more_body": False}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            logger.info(
                '%s "%s %s" %d %.1fms request_id=%s',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1e3,
                rid,
            )

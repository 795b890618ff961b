"""Request guards: API key and draining (a pure ASGI middleware), body size and content type.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) so that streaming responses and
client-disconnect detection pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from carpool.server.errors import APIError

# The OpenAI routes and vLLM's tokenizer routes (they read the served model).
_GUARDED = ("/v1/", "/tokenize", "/detokenize")


class GuardMiddleware:
    """Refuse ``/v1/*`` requests without the right API key (401) or while draining (503).

    ``/health`` and ``/metrics`` stay open.

    Args:
        app: the wrapped ASGI app.
        api_key: the expected bearer token (None = no auth).
        is_draining: True once the server stopped accepting requests.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.api_key = api_key
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_GUARDED):
            error = None
            if self.api_key is not None and not authorized(Headers(scope=scope), self.api_key):
                error = APIError(
                    401,
                    "missing or invalid API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                )
            elif self.is_draining():
                error = APIError(
                    503,
                    "the server is shutting down",
                    code="shutting_down",
                    headers={"Retry-After": "5"},
                )
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def authorized(headers: Headers, api_key: str) -> bool:
    """True when ``Authorization: Bearer <api_key>`` (compared in constant time)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing non-JSON content types and bodies over ``limit`` bytes.

    The ``Content-Length`` header is checked first, then the bytes actually received are
    counted (a chunked body, or a client that lies about the length).
    """
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {ctype or 'none'!r}",
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise APIError(
                413,
                f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)

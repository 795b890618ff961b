"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through ``APIError`` so that clients (the ``openai``
package among them) always see the same shape, never FastAPI's default 422 body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from carpool.errors import CarpoolError

logger = logging.getLogger("carpool.server")
# Set in a request's ``scope["state"]`` by the connection layer (``http_protocol``) when it cut
# a body that did not arrive within the body timeout.
BODY_TIMEOUT_MARK = "carpool.body_timeout"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error to report to the client as an OpenAI-style body.

    Args:
        status: the HTTP status code.
        message: what went wrong, for a human.
        param: the request field at fault (``"messages[0].content"``), if any.
        code: a machine-readable code (``"rate_limit_exceeded"``), if any.
        type: the error type; derived from ``status`` when omitted.
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002  (OpenAI's field name)
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_to_api(e: BaseException, retry_after: int | None = None) -> APIError:
    """The HTTP error an exception stands for, read off its type and fields (never its text).

    Args:
        e: an ``APIError`` (returned as is), a ``CarpoolError`` (its ``status``, ``param``,
            ``code`` and ``retry_after``), or anything else (a 500 naming its type).
        retry_after: overrides a 429's ``Retry-After`` (the server's ``retry_after``).
    """
    if isinstance(e, APIError):
        return e
    if isinstance(e, CarpoolError):
        wait = e.retry_after
        if e.status == 429 and retry_after is not None:
            wait = retry_after
        headers = {"Retry-After": str(wait)} if wait is not None else None
        return APIError(e.status, e.message, param=e.param, code=e.code, headers=headers)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\].*)$")


def loc_to_param(loc: Sequence[int | str]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"``.

    Pydantic puts the union member it tried into ``loc`` (``"str"``, ``"list[int]"``); those
    tags are dropped so that the param names a field of the request.
    """
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue  # FastAPI prefixes body fields with "body"
        if isinstance(part, int):
            out += f"[{part}]"
        elif _TYPE_TAGS.match(str(part)) or not str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error_to_api(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming the field."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error") or err.get("msg", "")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = loc_to_param(err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if param is None and err.get("type") == "value_error":
        # model validators raise "field: what is wrong"
        m = re.match(r"(?:Value error, )?([A-Za-z_][\w.\[\]]*): (.*)", msg, re.S)
        if m:
            return APIError(400, f"{m.group(1)}: {m.group(2)}", param=m.group(1))
    if param is None:
        if err.get("type") == "model_type":
            return APIError(400, "the request body must be a JSON object")
        return APIError(400, msg)
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(400, f"{param}: {msg} (got {shown})", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error FastAPI or the server raises to the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_api(exc.errors()).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error_to_api(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(
            exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Not a server error: one line, no traceback. Nobody reads the answer; 499 (nginx's
        # "client closed request") is what the access log shows, or 408 when the connection
        # layer cut a body that did not arrive in time (it logged that itself).
        if request.scope.get("state", {}).get(BODY_TIMEOUT_MARK):
            return Response(status_code=408)
        client = request.client
        logger.info(
            "%s disconnected before its request body was complete (%s %s)",
            f"{client.host}:{client.port}" if client else "the client",
            request.method,
            request.url.path,
        )
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return APIError(500, f"internal server error: {type(exc).__name__}").response()

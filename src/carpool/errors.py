"""Every exception carpool raises on purpose, each carrying what a client needs to know.

An error is *structure*, not text: ``param`` names the request field at fault, ``code`` is a
machine-readable tag, and the class fixes the HTTP status it maps to. The HTTP layer maps errors
by type (``status``/``code``/``param``), never by reading the message, and the replica pipe
carries the same structure (``ErrorInfo``) so an error raised in a replica process reaches the
client exactly as if it had been raised in-process.

Invariants inside the engine are plain ``assert`` statements with the offending value; these
classes are what a *caller* can catch and act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class CarpoolError(Exception):
    """Base class of every error carpool raises on purpose.

    Args:
        message: what went wrong, for a human.
        param: the request field at fault (``"max_tokens"``, ``"prompt"``), if any.
        code: a machine-readable code; the class default when None.

    Class attributes:
        status: the HTTP status the server answers with.
        default_code: the ``code`` when none is given.
        retry_after: seconds a client should wait before retrying (None: do not suggest).
    """

    status: ClassVar[int] = 500
    default_code: ClassVar[str | None] = None
    retry_after: ClassVar[int | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields survive pickling (multiprocessing, Ray) as they do ``info()``.
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def info(self) -> ErrorInfo:
        """The error as plain data (what crosses a process boundary)."""
        return ErrorInfo(type(self).__name__, self.message, self.param, self.code)


def _rebuild(
    cls: type[CarpoolError], message: str, param: str | None, code: str | None
) -> CarpoolError:
    return cls(message, param=param, code=code)


class ModelLoadError(CarpoolError):
    """A model file is missing, unsupported, truncated or inconsistent.

    The message always names the file (or directory) and what is wrong with it.
    """


class InvalidRequestError(CarpoolError, ValueError):
    """A request that can never be served as given (bad parameters, prompt too long...).

    Subclasses ``ValueError`` so that plain-Python callers catching ``ValueError`` see it too.
    """

    status = 400


class ContextLengthError(InvalidRequestError):
    """Prompt + max_tokens do not fit the context or the whole KV cache."""

    default_code = "context_length_exceeded"


class QueueFullError(CarpoolError):
    """Too many requests wait already (``max_queue``); the caller should retry later."""

    status = 429
    default_code = "rate_limit_exceeded"
    retry_after = 1


class EngineStoppedError(CarpoolError):
    """The engine is shutting down (or not started) and takes no new requests."""

    status = 503
    default_code = "shutting_down"
    retry_after = 5


class ReplicaUnavailableError(EngineStoppedError):
    """No replica can take the request now (all down or restarting), or the replica serving
    it died after it had sent tokens."""

    default_code = "replica_unavailable"


class RequestTimeoutError(CarpoolError):
    """The request passed its deadline; it was aborted and its KV blocks freed."""

    status = 504
    default_code = "request_timeout"


class EngineDeadError(CarpoolError):
    """The engine loop failed and cannot serve further requests."""

    default_code = "engine_dead"


_BY_NAME: dict[str, type[CarpoolError]] = {
    c.__name__: c
    for c in (
        CarpoolError,
        ModelLoadError,
        InvalidRequestError,
        ContextLengthError,
        QueueFullError,
        EngineStoppedError,
        ReplicaUnavailableError,
        RequestTimeoutError,
        EngineDeadError,
    )
}


@dataclass(frozen=True)
class ErrorInfo:
    """A ``CarpoolError`` as plain, picklable data (the replica pipe carries this).

    Attributes:
        kind: the exception class name (one of this module's classes).
        message, param, code: as on the exception.
    """

    kind: str
    message: str
    param: str | None = None
    code: str | None = None

    def to_exception(self) -> CarpoolError:
        """The exception this stands for (``CarpoolError`` for an unknown kind)."""
        cls = _BY_NAME.get(self.kind, CarpoolError)
        return cls(self.message, param=self.param, code=self.code)


def as_carpool_error(e: BaseException) -> CarpoolError:
    """``e`` itself when it is a ``CarpoolError``; otherwise a 500 naming its type."""
    if isinstance(e, CarpoolError):
        return e
    return CarpoolError(f"{type(e).__name__}: {e}")

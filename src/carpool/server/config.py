"""``ServerConfig``: how the HTTP server behaves (the engine has its own ``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server behaves (the engine has its own ``EngineConfig``).

    Attributes:
        host, port: where to listen (loopback unless told otherwise).
        served_model_name: the model id clients must send (None: the model directory's name,
            or ``carpool-default`` for the embedded model).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <key>``.
        max_queue: most requests waiting to be scheduled; more get 429 (None = unbounded).
        request_timeout: default per-request deadline in seconds (None = none).
        max_body_bytes: largest request body accepted (413 beyond).
        shutdown_grace: seconds in-flight requests get to finish on SIGTERM/SIGINT.
        retry_after: seconds suggested to a client refused with 429.
        log_interval: seconds between periodic engine log lines while busy.
        tool_call_parser: how to read tool calls from the model's text (``hermes``,
            ``llama3_json``); None picks the format the chat template teaches.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int | None = None
    request_timeout: float | None = None
    max_body_bytes: int = 1 << 20
    shutdown_grace: float = 30.0
    retry_after: int = 1
    log_interval: float = 5.0
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        from carpool.tools.parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {sorted(PARSERS)}, got {self.tool_call_parser!r}"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")

"""``ServerConfig``: how the HTTP server behaves (the engine has its own ``EngineConfig``).

Its fields are the ``carpool serve`` flags (generated, see ``entrypoints/config_args.py``), and
its ``max_queue``/``request_timeout`` apply to an in-process engine and to a replica pool alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.config import check_positive, option, parse_bytes


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server behaves; every field is also a ``carpool serve`` flag."""

    host: str = option("127.0.0.1", "address to bind (127.0.0.1: loopback only)")
    port: int = option(8000, "port to listen on")
    served_model_name: str | None = option(
        None,
        "model id clients send (none: the model directory's name, or carpool-default for "
        "the embedded model)",
    )
    api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on /v1/* (none: no auth)"
    )
    max_queue: int | None = option(
        None, "most requests waiting to be scheduled; more get 429 (none: no limit)"
    )
    request_timeout: float | None = option(
        None,
        "seconds a request may take before it is ended with an error (none: no limit; "
        "requests may also send 'timeout')",
    )
    max_body_bytes: int = option(
        1 << 20, "largest request body, e.g. 1MiB; larger gets 413", parse=parse_bytes
    )
    shutdown_grace: float = option(
        30.0, "seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )
    retry_after: int = option(1, "seconds suggested in Retry-After to a client refused with 429")
    log_interval: float = option(5.0, "seconds between engine status log lines while busy")
    tool_call_parser: str | None = option(
        None,
        "tool-call format to parse from the model's text (none: the one the chat template teaches)",
        choices=("hermes", "llama3_json"),
    )
    dashboard_fps: float = option(
        10.0, "updates per second of the live dashboard's stream /v1/stats/stream (at most 10)"
    )
    max_stream_backlog: int = option(
        1 << 20,
        "most output a streaming client may leave unread (its size as events, e.g. 1MiB); a "
        "client further behind gets an error event, its request is aborted and its connection "
        "closed",
        parse=parse_bytes,
    )

    def __post_init__(self) -> None:
        check_positive(self, "max_queue", "retry_after")
        check_positive(self, "max_body_bytes", "max_stream_backlog", low=1024)
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 <= self.port <= 65535
        ):
            raise ValueError(f"port must be in 0..65535 (0: any free port), got {self.port!r}")
        if not 0 < self.dashboard_fps <= 10:
            raise ValueError(f"dashboard_fps must be in (0, 10], got {self.dashboard_fps}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        from carpool.tools.parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {sorted(PARSERS)}, got {self.tool_call_parser!r}"
            )

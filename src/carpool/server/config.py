"""``ServerConfig``: how the HTTP server behaves (the engine has its own ``EngineConfig``).

Its fields are the ``carpool serve`` flags (generated, see ``entrypoints/config_args.py``), and
its ``max_queue``/``request_timeout`` apply to an in-process engine and to a replica pool alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from carpool.config import check_positive, option, parse_bytes

# The environment variable read for the API key when no flag gives one (vLLM's VLLM_API_KEY is
# vLLM's: a machine running both keeps them apart).
API_KEY_ENV = "CARPOOL_API_KEY"


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
        None,
        "most sequences (prompts x n of each request) waiting to be scheduled beyond the free "
        "seats; more get 429 (none: no limit)",
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
    header_timeout: float = option(
        30.0,
        "seconds a client has to send a request's line and headers, counted from the "
        "connection (or the request's first byte); later gets 408 and the connection closed",
    )
    body_timeout: float = option(
        60.0,
        "seconds a client has to send a whole request body once its headers arrived; later "
        "gets 408 and the connection closed",
    )
    max_connections: int | None = option(
        None,
        "most client connections open at once; a request on one beyond them gets 503 and the "
        "connection closed (none: half the process's open-file limit)",
    )
    max_header_bytes: int = option(
        64 << 10,
        "largest request line plus headers, e.g. 64KiB; larger gets 431",
        parse=parse_bytes,
    )
    max_header_count: int = option(100, "most headers in one request; more gets 431")
    api_key_file: str | None = option(
        None,
        "read the API key from this file (one line, whitespace stripped) instead of --api-key, "
        "which the process list shows; the CARPOOL_API_KEY environment variable is read when "
        "neither is given",
    )
    max_seqs_per_request: int = option(
        256,
        "most sequences one request may ask for (prompts x n); more get 400 (a ceiling on one "
        "client's share, as --max-queue, which also counts sequences, is on the queue)",
    )
    replica_liveness_timeout: float = option(
        10.0,
        "with --replicas: seconds a replica may send no heartbeat before it is marked down, "
        "its requests are retried elsewhere or failed, and it is killed and restarted",
    )
    max_stream_backlog: int = option(
        1 << 20,
        "most output a streaming client may leave unread (its size as events, e.g. 1MiB); a "
        "client further behind gets an error event, its request is aborted and its connection "
        "closed",
        parse=parse_bytes,
    )

    def __post_init__(self) -> None:
        check_positive(
            self, "max_queue", "retry_after", "max_connections", "max_header_count",
            "max_seqs_per_request",
        )  # fmt: skip
        check_positive(self, "max_body_bytes", "max_header_bytes", "max_stream_backlog", low=1024)
        for name in ("header_timeout", "body_timeout", "replica_liveness_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give the API key once: --api-key or --api-key-file, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
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

    def __repr__(self) -> str:
        # The generated repr would show the API key to whoever logs or prints the config.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if shown["api_key"] is not None:
            shown["api_key"] = "***"
        return f"ServerConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def resolve_api_key(config: ServerConfig, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """``config`` with its API key in ``api_key``, wherever it was given.

    Precedence: ``api_key`` (``--api-key``), else the file ``api_key_file`` (``--api-key-file``;
    its content, surrounding whitespace stripped, one line), else ``environ[CARPOOL_API_KEY]``
    (``carpool serve`` passes ``os.environ``), else no key. The two flags exclude each other.

    Raises:
        ValueError: the file cannot be read, is empty or holds more than one line, or the
            variable is set but blank. The message names the file or variable, never the key.
    """
    if config.api_key is not None:
        return config
    key: str | None = None
    if config.api_key_file is not None:
        path = Path(config.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise ValueError(f"cannot read the API key file {str(path)!r}: {why}") from None
        if not key or "\n" in key:
            raise ValueError(f"the API key file {str(path)!r} must hold one non-empty line")
    elif environ is not None and API_KEY_ENV in environ:
        key = environ[API_KEY_ENV].strip()
        if not key:
            raise ValueError(f"{API_KEY_ENV} is set but empty")
    return dataclasses.replace(config, api_key=key, api_key_file=None)

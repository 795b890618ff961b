"""``carpool serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

On SIGTERM or SIGINT the server stops accepting requests (503, then the listening socket
closes), lets in-flight requests finish for up to ``--shutdown-grace`` seconds, stops the
engine and exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Generator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from carpool.entrypoints.config_args import add_config_arguments, config_from_args
from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args
from carpool.errors import CarpoolError

if TYPE_CHECKING:
    from carpool.config import EngineConfig
    from carpool.replicas import ReplicaPool

logger = logging.getLogger("carpool.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (one per ``ServerConfig`` field), the replicas', then the engine's."""
    from carpool.server.config import ServerConfig

    add_config_arguments(p, ServerConfig, "server")
    _add_replica_arguments(p)
    add_engine_arguments(p)


def _add_replica_arguments(p: argparse.ArgumentParser) -> None:
    """Scale-out flags: N engine processes behind the one front end (docs/scaling.md)."""
    from carpool.replicas.router import ROUTING_POLICIES

    g = p.add_argument_group("replicas")
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="engine worker processes, each with its own model and KV cache (default: 1, "
        "in-process; or one per --devices entry)",
    )
    g.add_argument(
        "--devices",
        type=lambda text: tuple(d.strip() for d in text.split(",") if d.strip()),
        default=(),
        help="torch devices of the replicas, cycled, e.g. cpu,cpu or cuda:0,cuda:1 "
        "(default: --device for all)",
    )
    g.add_argument(
        "--routing",
        default="least-loaded",
        choices=ROUTING_POLICIES,
        help="how a replica is picked per request (default: least-loaded)",
    )
    g.add_argument(
        "--threads-per-replica",
        type=int,
        default=None,
        help="torch threads in each replica (default: CPU cores / replicas)",
    )


def _replica_pool(args: argparse.Namespace, engine_config: EngineConfig) -> ReplicaPool | None:
    """The pool the flags ask for, or None for the single in-process engine."""
    from carpool.replicas import ReplicaPool, ReplicaPoolConfig

    n = args.replicas if args.replicas is not None else max(1, len(args.devices))
    if n == 1 and not args.devices:
        return None
    return ReplicaPool(
        ReplicaPoolConfig(
            engine_config=engine_config,
            num_replicas=n,
            devices=args.devices,
            routing=args.routing,
            threads_per_replica=args.threads_per_replica,
        )
    )


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, exit 0 after a graceful shutdown."""
    from carpool.server.app import build_app
    from carpool.server.config import ServerConfig

    try:
        engine_config = engine_config_from_args(args)
        config = config_from_args(ServerConfig, args)
        pool = _replica_pool(args, engine_config)
    except (CarpoolError, ValueError) as e:
        logger.error("%s", e)
        return 2
    app = build_app(pool if pool is not None else engine_config, config)
    state = app.state.carpool

    def start_draining() -> None:
        state.draining = True

    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        timeout_graceful_shutdown=max(1, round(config.shutdown_grace)),
        access_log=False,
    )
    server = GracefulServer(uv_config, on_exit=start_draining)
    try:
        sock = _bind(config.host, config.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, e)
        return 2
    logger.info(
        "serving %r on http://%s:%d/v1 (health: /health, metrics: /metrics)",
        state.model_name,
        config.host,
        sock.getsockname()[1],
    )
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with a hook on the exit signal and a clean exit code.

    uvicorn re-raises the captured signal once it has shut down, which would end the process
    with -SIGTERM; a graceful shutdown is a success, so this server does not.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info(
                "received %s: draining (grace %ss)",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown,
            )
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        originals = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in originals.items():
                signal.signal(s, handler)

"""``carpool serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

On SIGTERM or SIGINT the server stops accepting requests (503, then the listening socket
closes), lets in-flight requests finish for up to ``--shutdown-grace`` seconds, stops the
engine and exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from carpool.entrypoints.config_args import add_config_arguments, config_from_args
from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args
from carpool.errors import CarpoolError

if TYPE_CHECKING:
    from carpool.config import EngineConfig
    from carpool.engine.llm_engine import LLMEngine
    from carpool.replicas import ReplicaPool
    from carpool.server.app import ServerState

logger = logging.getLogger("carpool.server")
# carpool.replicas.router.ROUTING_POLICIES, spelled out for --help (tested equal).
ROUTING_NAMES = ("least-loaded", "power-of-two", "round-robin")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (one per ``ServerConfig`` field), the replicas', then the engine's."""
    from carpool.server.config import ServerConfig

    add_config_arguments(p, ServerConfig, "server")
    _add_replica_arguments(p)
    add_engine_arguments(p)


def _add_replica_arguments(p: argparse.ArgumentParser) -> None:
    """Scale-out flags: N engine processes behind the one front end (docs/scaling.md)."""
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
        # Validated by ReplicaPoolConfig: importing carpool.replicas here would load torch.
        help=f"how a replica is picked per request: {', '.join(ROUTING_NAMES)} "
        "(default: least-loaded)",
    )
    g.add_argument(
        "--threads-per-replica",
        type=int,
        default=None,
        help="torch threads in each replica (default: CPU cores / replicas)",
    )


def _replica_pool(
    args: argparse.Namespace, engine_config: EngineConfig, liveness_timeout: float = 10.0
) -> ReplicaPool | None:
    """The pool the flags ask for, or None for the single in-process engine.

    Raises:
        ValueError: ``--threads-per-replica`` without replicas (it would be ignored).
    """
    n = args.replicas if args.replicas is not None else max(1, len(args.devices))
    if n == 1 and not args.devices:
        if args.threads_per_replica is not None:
            raise ValueError(
                "--threads-per-replica needs --replicas N (or --devices); for one engine "
                "use --threads"
            )
        return None
    from carpool.config import AUTO_THREADS
    from carpool.engine.threads import physical_cores
    from carpool.replicas import ReplicaPool, ReplicaPoolConfig

    # Each replica sets its threads before loading, and its engine keeps that number.
    threads = args.threads_per_replica or engine_config.threads
    if threads == AUTO_THREADS:  # this machine's physical cores, shared out
        threads = max(1, physical_cores() // n)
    threads = threads or max(1, (os.cpu_count() or 1) // n)
    return ReplicaPool(
        ReplicaPoolConfig(
            engine_config=dataclasses.replace(engine_config, threads=threads),
            num_replicas=n,
            devices=args.devices,
            routing=args.routing,
            threads_per_replica=threads,
            liveness_timeout=liveness_timeout,
        )
    )


def load_engine(engine_config: EngineConfig) -> LLMEngine:
    """Load the model (logging each stage) and warm it up with one short request."""
    from carpool.engine.llm_engine import LLMEngine
    from carpool.engine.stats import EngineStats
    from carpool.sampling_params import SamplingParams

    llm = LLMEngine(engine_config)
    start = time.perf_counter()
    # The first forward pass pays for lazy initialisation (allocator, kernels' dispatch): a
    # two-token request here keeps that out of the first client's latency.
    llm.add_request(
        [llm.eos_token_ids[0] if llm.eos_token_ids else 0],
        SamplingParams(max_tokens=2, ignore_eos=True),
        "warm-up",
    )
    while llm.has_unfinished():
        llm.step()
    llm.stats = EngineStats()  # the warm-up is not traffic
    logger.info("loading: warm-up done in %.1fs", time.perf_counter() - start)
    return llm


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, exit 0 after a graceful shutdown.

    Returns 2 for bad flags and 1 when the model cannot load (one error line each, no server
    left answering 503): systemd, docker and CI see the failure.
    """
    from carpool.native_caches import bound_native_caches

    bound_native_caches()  # before torch runs anything (read once, at the first matmul)
    from carpool.engine.threads import run_in_own_thread
    from carpool.server.app import build_app
    from carpool.server.config import ServerConfig, resolve_api_key
    from carpool.server.http_protocol import ConnectionLimits, protocol_class

    try:
        engine_config = engine_config_from_args(args)
        # The key from --api-key, --api-key-file or CARPOOL_API_KEY (in that order).
        config = resolve_api_key(config_from_args(ServerConfig, args), os.environ)
        pool = _replica_pool(args, engine_config, config.replica_liveness_timeout)
    except (CarpoolError, ValueError) as e:
        logger.error("%s", e)
        return 2
    try:
        sock = _bind(config.host, config.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, e)
        return 2
    if pool is None:
        try:
            # In a thread that ends: the engine thread's OpenMP pool stays the only one.
            engine = run_in_own_thread(load_engine, engine_config)
        except Exception as e:  # any failure to load ends the process with one line
            sock.close()
            logger.error(
                "cannot load the model %r: %s", engine_config.model or "default", _one_line(e)
            )
            logger.debug("load failure", exc_info=True)
            return 1
        app = build_app(engine, config)
    else:
        try:  # the replicas load in their processes; the front end resolves the model now
            app = build_app(pool, config)
        except Exception as e:
            sock.close()
            logger.error(
                "cannot load the model %r: %s", engine_config.model or "default", _one_line(e)
            )
            return 1
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
        # Header/body deadlines, header limits, the connection cap, JSON protocol errors.
        http=protocol_class(ConnectionLimits.from_config(config)),
    )
    url = f"http://{config.host}:{sock.getsockname()[1]}/v1"
    server = GracefulServer(uv_config, on_exit=start_draining, state=state, url=url)
    server.run(sockets=[sock])
    if state.load_error is not None or not server.started:
        return 1  # the replicas failed to load, or the app's startup failed
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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

    def __init__(
        self, config: uvicorn.Config, on_exit: Callable[[], None], state: ServerState, url: str
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._state, self._url = state, url
        self._announced = False

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: say "serving on" once ready; exit when the model (replicas) failed."""
        state = self._state
        if state.load_error is not None:
            logger.error("cannot load the model: %s", _one_line(state.load_error))
            return True
        if not self._announced and state.serving is not None:
            self._announced = True
            logger.info(
                "serving %r on %s (health: /health, metrics: /metrics)", state.model_name, self._url
            )
        return await super().on_tick(counter)

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

"""Serve carpool with Ray Serve: one carpool engine per Ray replica, Ray's router in front.

Beyond one machine, carpool does not route by itself: Ray Serve places replicas on the nodes
of a Ray cluster, routes each HTTP request to one of them (power of two choices over the
replicas' ongoing requests), queues or refuses requests (``max_ongoing_requests`` per replica,
``max_queued_requests`` in the callers), and adds or removes replicas (``autoscaling_config``).
Each Ray replica runs the single-engine carpool server unchanged: an ``LLMEngine`` in an
``AsyncEngine`` thread, behind the same FastAPI app (``build_app``), so routes, validation,
streaming and errors are those of ``carpool serve``.

Needs the optional extra: ``pip install 'carpool[ray]'``.

Example (one machine, a local Ray instance)::

    import ray
    from ray import serve
    from carpool.config import EngineConfig
    from carpool.integrations.ray_serve import build_ray_app

    ray.init(num_cpus=4)
    app = build_ray_app(EngineConfig(model="path/to/model"), num_replicas=2)
    serve.run(app, name="carpool", route_prefix="/")   # http://127.0.0.1:8000/v1/...

Or from the shell: ``python -m carpool.integrations.ray_serve --model DIR --num-replicas 2``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

try:
    from ray import serve
    from ray.serve import Application
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "carpool.integrations.ray_serve needs Ray Serve: pip install 'carpool[ray]'"
    ) from e

from fastapi import FastAPI

from carpool.config import EngineConfig
from carpool.server.app import build_app
from carpool.server.config import ServerConfig

logger = logging.getLogger("carpool.ray")


@serve.ingress()
class CarpoolDeployment:
    """One Ray Serve replica: a carpool engine and its OpenAI-compatible app.

    The model is loaded in the constructor, so Ray counts the replica as started only once it
    can serve; Ray then calls ``__serve_build_asgi_app__`` and runs the app's lifespan (which
    starts the engine thread) before routing requests to it.

    Args:
        engine_config: the engine of this replica.
        server_config: the app's behaviour (its ``host``/``port`` are unused: Ray's proxy
            listens).
        threads: torch intra-op threads of the replica (None: torch's default). Match it to
            the replica's ``num_cpus``.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        server_config: ServerConfig | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from carpool.engine.llm_engine import LLMEngine
        from carpool.engine.threads import run_in_own_thread

        if threads is not None:
            torch.set_num_threads(threads)
        # In a thread that ends: the AsyncEngine thread's OpenMP pool stays the only one.
        self._engine = run_in_own_thread(LLMEngine, engine_config)
        self._server_config = server_config or ServerConfig()
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app Ray's proxy forwards HTTP requests to (called once, after ``__init__``)."""
        self._app = build_app(self._engine, self._server_config)
        return self._app

    def check_health(self) -> None:
        """Ray's periodic health check: raising makes Ray replace the replica."""
        if self._app is None:
            return
        engine = self._app.state.carpool.engine
        if engine is not None and not engine.is_running and not self._app.state.carpool.draining:
            raise RuntimeError("the carpool engine thread is not running")


def build_ray_app(
    engine_config: EngineConfig,
    server_config: ServerConfig | None = None,
    *,
    num_replicas: int = 1,
    autoscaling_config: dict[str, Any] | None = None,
    max_ongoing_requests: int = 64,
    max_queued_requests: int = -1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = None,
    name: str = "carpool",
) -> Application:
    """A Ray Serve application of carpool replicas (pass it to ``serve.run``).

    Args:
        engine_config: every replica's engine (``device="cuda"`` with ``num_gpus=1`` on GPU
            nodes: Ray sets ``CUDA_VISIBLE_DEVICES`` per replica).
        server_config: the app's behaviour (served model name, API key, timeouts).
        num_replicas: fixed number of replicas (ignored when ``autoscaling_config`` is set).
        autoscaling_config: Ray Serve autoscaling, e.g. ``{"min_replicas": 1,
            "max_replicas": 4, "target_ongoing_requests": 32}``.
        max_ongoing_requests: most requests Ray sends to one replica at once; match it to the
            engine's batch (``max_num_seqs``) so queueing happens in Ray, where it can be
            spread, rather than in one engine.
        max_queued_requests: most requests waiting in Ray for a replica; beyond it Ray answers
            503 (-1: no limit).
        num_cpus, num_gpus: Ray resources reserved per replica.
        threads: torch threads per replica (default: ``int(num_cpus)``, at least 1).
        name: the deployment's name.
    """
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(CarpoolDeployment).options(**options)
    threads = threads if threads is not None else max(1, int(num_cpus))
    return deployment.bind(engine_config, server_config, threads)


def main(argv: list[str] | None = None) -> int:
    """``python -m carpool.integrations.ray_serve``: serve on a local (or given) Ray cluster."""
    import ray

    from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args

    p = argparse.ArgumentParser(prog="python -m carpool.integrations.ray_serve")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start one)")
    p.add_argument("--host", default="127.0.0.1", help="Ray Serve's HTTP host")
    p.add_argument("--port", type=int, default=8000, help="Ray Serve's HTTP port")
    p.add_argument("--num-replicas", type=int, default=1, help="replicas (default: 1)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many")
    p.add_argument("--max-ongoing-requests", type=int, default=64)
    p.add_argument("--max-queued-requests", type=int, default=-1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default: 0)")
    p.add_argument("--served-model-name", default=None)
    add_engine_arguments(p)
    args = p.parse_args(argv)
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {
            "min_replicas": args.num_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": max(1, args.max_ongoing_requests // 2),
        }
    app = build_ray_app(
        engine_config_from_args(args),
        ServerConfig(served_model_name=args.served_model_name),
        num_replicas=args.num_replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="carpool", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

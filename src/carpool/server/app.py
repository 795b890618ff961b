"""The FastAPI app: routes, request guards (auth, body size, content type), life cycle.

``build_app(engine_or_config, ServerConfig)`` returns an app whose lifespan starts the engine
thread (loading the model in the background when given a config, with ``/health`` answering
503 meanwhile) and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from carpool.config import EngineConfig
from carpool.engine.async_engine import AsyncEngine
from carpool.engine.client import EngineClient
from carpool.engine.llm_engine import LLMEngine
from carpool.engine.model_path import embedded_model_path, resolve_model_path
from carpool.replicas.metrics import ReplicaMetrics
from carpool.replicas.pool import ReplicaPool
from carpool.server.access_log import AccessLogMiddleware
from carpool.server.chat import ChatServing
from carpool.server.completions import CompletionServing
from carpool.server.config import ServerConfig, resolve_api_key
from carpool.server.dashboard import install_dashboard
from carpool.server.errors import APIError, install_error_handlers, validation_error_to_api
from carpool.server.metrics import ServerMetrics
from carpool.server.middleware import GuardMiddleware, read_body
from carpool.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    describe_unknown_fields,
    dump,
)
from carpool.server.protocol_ext import DetokenizeRequest, TokenizeRequest
from carpool.server.utility import UtilityServing, carpool_version
from carpool.tools.parsers import choose_parser

logger = logging.getLogger("carpool.server")
M = TypeVar("M", bound=BaseModel)


def default_served_name(model: str | None, path: Path) -> str:
    """A Hub id as given (like vLLM); else the model directory's (or GGUF file's) name;
    ``carpool-default`` for the embedded model."""
    if path == embedded_model_path():
        return "carpool-default"
    if model and "/" in model and not Path(model).exists():
        return model
    return path.stem if path.is_file() else path.name


class Serving:
    """Both OpenAI endpoints over one ``EngineClient``."""

    def __init__(
        self,
        client: EngineClient,
        model_name: str,
        retry_after: int,
        metrics: ServerMetrics,
        tool_call_parser: str | None = None,
        max_seqs_per_request: int = 256,
        max_stream_backlog: int = 1 << 20,
    ) -> None:
        self.client = client
        args = (client, model_name, retry_after, metrics, max_seqs_per_request, max_stream_backlog)
        self.completions = CompletionServing(*args)
        self.chat = ChatServing(*args)
        self.utility = UtilityServing(client, model_name, retry_after, metrics)
        self.chat.tool_parser = choose_parser(client.tokenizer.chat_template, tool_call_parser)
        self.max_model_len = client.limits.max_model_len


class ServerState:
    """What the routes share: the engine (once loaded), metrics, and the draining flag."""

    def __init__(self, config: ServerConfig, model_name: str) -> None:
        self.config = config
        self.model_name = model_name
        self.metrics = ServerMetrics(model_name)
        self.engine: AsyncEngine | ReplicaPool | None = None
        self.serving: Serving | None = None
        self.load_error: BaseException | None = None
        self.draining = False

    def attach(self, llm: LLMEngine) -> None:
        """Wrap a loaded engine and start its thread."""
        c = self.config
        engine = AsyncEngine(
            llm,
            max_queue=c.max_queue,
            request_timeout=c.request_timeout,
            observer=self.metrics,
            log_interval=c.log_interval,
        )
        engine.start()
        self._serve(engine)

    def attach_pool(self, pool: ReplicaPool) -> None:
        """Serve through a started, ready pool of replica processes."""
        self._serve(pool)

    def _serve(self, client: EngineClient) -> None:
        """Route requests to ``client`` (an in-process engine or a replica pool)."""
        c = self.config
        self.serving = Serving(
            client,
            self.model_name,
            c.retry_after,
            self.metrics,
            c.tool_call_parser,
            c.max_seqs_per_request,
            c.max_stream_backlog,
        )
        self.engine = client

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_running and not self.draining


def build_app(
    engine_or_config: LLMEngine | EngineConfig | ReplicaPool, config: ServerConfig | None = None
) -> FastAPI:
    """The OpenAI-compatible app over one engine, or over a pool of replica processes.

    Args:
        engine_or_config: a loaded ``LLMEngine`` (served at once; load it in a thread that
            has ended, ``carpool.engine.threads.run_in_own_thread``), an ``EngineConfig``
            (loaded in a background thread at startup; ``/health`` says 503 until ready), or
            a ``ReplicaPool`` (not started: its processes start with the app and it serves
            once every replica loaded or failed).
        config: server behaviour (defaults: ``ServerConfig()``); its ``max_queue`` and
            ``request_timeout`` apply to the engine and to a pool alike. Its connection
            options (timeouts, header limits, ``max_connections``) take effect through the
            uvicorn protocol of ``carpool.server.http_protocol`` (``carpool serve`` uses it).
    """
    config = resolve_api_key(config or ServerConfig())  # api_key_file read once, here
    if isinstance(engine_or_config, LLMEngine):
        ec, path = engine_or_config.config, engine_or_config.model_path
    else:
        ec = (
            engine_or_config.config.engine_config
            if isinstance(engine_or_config, ReplicaPool)
            else engine_or_config
        )
        path = resolve_model_path(ec.model, ec.revision, ec.gguf_file)
    state = ServerState(config, config.served_model_name or default_served_name(ec.model, path))

    def load() -> None:
        try:
            assert isinstance(engine_or_config, EngineConfig)
            state.attach(LLMEngine(engine_or_config))
            logger.info("model loaded; serving %r", state.model_name)
        except BaseException as e:  # reported by /health and every request
            logger.exception("model failed to load")
            state.load_error = e

    async def start_pool(pool: ReplicaPool) -> None:
        try:
            await pool.wait_ready()
            state.attach_pool(pool)
            logger.info("%d replicas loaded; serving %r", len(pool.replicas), state.model_name)
        except Exception as e:  # reported by /health and every request
            logger.exception("the replicas failed to load")
            state.load_error = e

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool_task = None
        if isinstance(engine_or_config, ReplicaPool):
            pool = engine_or_config
            pool.observer = state.metrics
            pool.max_queue, pool.request_timeout = config.max_queue, config.request_timeout
            pool.replica_observer = ReplicaMetrics(
                state.metrics.registry, state.model_name, len(pool.replicas)
            )
            await pool.start()
            pool_task = asyncio.ensure_future(start_pool(pool))
        elif isinstance(engine_or_config, LLMEngine):
            state.attach(engine_or_config)
        else:
            threading.Thread(target=load, name="carpool-load", daemon=True).start()
        yield
        state.draining = True
        if isinstance(engine_or_config, ReplicaPool):
            if pool_task is not None:
                pool_task.cancel()
            await engine_or_config.shutdown()
        elif state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="carpool", lifespan=lifespan)
    app.state.carpool = state
    install_error_handlers(app)

    app.add_middleware(GuardMiddleware, api_key=config.api_key, is_draining=lambda: state.draining)
    app.add_middleware(AccessLogMiddleware)  # outermost: sees every answer, 4xx included

    def serving() -> Serving:
        if state.load_error is not None:
            raise APIError(503, f"the model failed to load: {state.load_error}")
        if state.serving is None:
            raise APIError(
                503, "the model is still loading", code="loading", headers={"Retry-After": "5"}
            )
        return state.serving

    async def parse(request: Request, model: type[M]) -> M:
        body = await read_body(request, config.max_body_bytes)
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error_to_api(e.errors(include_url=False)) from None
        unknown = getattr(req, "unknown_fields", list)()
        if unknown:
            logger.warning("%s: ignoring %s", request.url.path, describe_unknown_fields(unknown))
        return req

    @app.get("/health")
    async def health() -> Response:
        if isinstance(engine_or_config, ReplicaPool):
            return pool_health(engine_or_config)
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.load_error is not None:
            return JSONResponse(
                {"status": "failed", "error": str(state.load_error)}, status_code=503
            )
        if state.engine is not None and not state.engine.is_running:
            return JSONResponse({"status": "engine_failed"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def pool_health(pool: ReplicaPool) -> Response:
        """200 while at least one replica is ready ("degraded" when not all are)."""
        replicas = pool.describe()
        num_ready = sum(r["state"] == "ready" for r in replicas)
        if state.draining:
            status = "shutting_down"
        elif state.load_error is not None:
            status = "failed"
        elif state.serving is None:
            status = "loading"
        elif num_ready == 0:
            status = "unavailable"
        else:
            status = "ok" if num_ready == len(replicas) else "degraded"
        code = 200 if status in ("ok", "degraded") else 503
        return JSONResponse({"status": status, "replicas": replicas}, status_code=code)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models() -> Response:
        max_len = state.serving.max_model_len if state.serving is not None else None
        card = ModelCard(id=state.model_name, max_model_len=max_len)
        return JSONResponse(dump(ModelList(data=[card])))

    @app.get("/v1/stats")
    async def stats() -> Response:
        """Debug view of the engine: running, waiting, KV blocks (tests assert all free)."""
        engine = serving().client
        s = engine.snapshot
        return JSONResponse(
            {
                "num_running": s.num_running,
                "num_waiting": engine.num_waiting,
                "num_unfinished": s.num_unfinished,
                "num_free_blocks": s.num_free_blocks,
                "num_blocks": s.num_blocks,
                "kv_cache_usage": s.kv_cache_usage,
                "steps": s.steps,
                "mean_batch_size": s.mean_batch_size,
                "num_preemptions": s.num_preemptions,
                "num_preemptions_by_cause": {
                    "kv_cache": s.num_preemptions_kv_cache,
                    "priority": s.num_preemptions_priority,
                },
                "generation_tokens": s.generation_tokens,
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits,
                "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            }
        )

    install_dashboard(
        app, lambda: serving().client, config.api_key is not None, max_fps=config.dashboard_fps
    )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        return await serving().completions.create_completion(req, request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await parse(request, TokenizeRequest)
        return JSONResponse(dump(await serving().utility.tokenize(req)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest)
        return JSONResponse(dump(await serving().utility.detokenize(req)))

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": carpool_version()})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        return await serving().chat.create_chat_completion(req, request)

    return app

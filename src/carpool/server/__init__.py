"""The OpenAI-compatible HTTP server: ``build_app(engine_or_config, ServerConfig)``."""

from carpool.server.app import build_app
from carpool.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app"]

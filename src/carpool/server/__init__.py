"""The OpenAI-compatible HTTP server: ``build_app(engine_or_config, ServerConfig)``."""

from carpool.server.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app"]

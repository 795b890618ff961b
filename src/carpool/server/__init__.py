"""The OpenAI-compatible HTTP server: ``build_app(engine_or_config, ServerConfig)``.

``build_app`` is imported on first use so that reading ``ServerConfig`` (the CLI's flags) does
not load the engine and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from carpool.server.config import ServerConfig

if TYPE_CHECKING:
    from carpool.server.app import build_app


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from carpool.server.app import build_app

        return build_app
    raise AttributeError(f"module 'carpool.server' has no attribute {name!r}")


__all__ = ["ServerConfig", "build_app"]

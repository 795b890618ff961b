"""A real uvicorn server over an in-process engine, for tests that reach into the engine.

Like the ``LiveServer`` of ``tests/server/conftest.py`` (which other test folders cannot
import): ``build_app`` over one ``LLMEngine`` on a free loopback port, healthy on return.
Being in-process, a test can inject a fault into the engine (monkeypatch) while real HTTP
clients talk to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.server import ServerConfig, build_app
from helpers.live_server import UvicornThread


class InProcessServer(UvicornThread):
    """``build_app(LLMEngine(...), server_config)`` served from a background thread.

    Args:
        model_dir: the model to load (float32 unless ``engine_args`` say otherwise).
        server_config: server options (default ``ServerConfig()``).
        engine_args: ``EngineConfig`` fields.
    """

    def __init__(
        self, model_dir: Path, server_config: ServerConfig | None = None, **engine_args: Any
    ) -> None:
        engine_args.setdefault("dtype", "float32")
        self.engine = LLMEngine(EngineConfig(model=str(model_dir), **engine_args))
        self.app = build_app(self.engine, server_config or ServerConfig())
        super().__init__(self.app)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.base_url}/stats", timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /v1/stats until nothing runs or waits; returns the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["num_unfinished"] == 0 and s["num_waiting"] == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {s}")
            time.sleep(0.05)

"""A real uvicorn server on a free loopback port, over a tiny random-weight Llama."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from carpool import LLM
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.server import ServerConfig, build_app
from helpers.hf_models import save_tiny_model_dir
from helpers.live_server import UvicornThread

MODEL_NAME = "tiny-llama"


class LiveServer(UvicornThread):
    """``build_app`` over one in-process engine, served by uvicorn in a background thread."""

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

    def stats(self, **headers: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base_url}/stats", headers=headers, timeout=5)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, timeout: float = 30.0, **headers: str) -> dict[str, Any]:
        """Poll /v1/stats until nothing runs or waits; returns the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats(**headers)
            if s["num_unfinished"] == 0 and s["num_waiting"] == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {s}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("srv") / MODEL_NAME
    d.mkdir()
    save_tiny_model_dir("llama", d)
    return d


@pytest.fixture(scope="session")
def reference(tiny_dir) -> LLM:
    """The offline API over the same model: what the server must reproduce."""
    return LLM(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="session")
def server(tiny_dir) -> Iterator[LiveServer]:
    s = LiveServer(tiny_dir)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def make_server(tiny_dir) -> Iterator[Any]:
    """Factory: ``make_server(ServerConfig(...), **engine_args)``; stopped at session end."""
    made: list[LiveServer] = []

    def make(server_config: ServerConfig | None = None, **engine_args: Any) -> LiveServer:
        s = LiveServer(tiny_dir, server_config, **engine_args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def first_text_difference(got: str, expected: str) -> str:
    """Readable description of where two texts part."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return (
                f"first difference at char {i}: {a!r} != {b!r}\n got: {got!r}\n exp: {expected!r}"
            )
    return f"lengths differ: {len(got)} vs {len(expected)}\n got: {got!r}\n exp: {expected!r}"


@pytest.fixture(scope="session")
def text_diff():
    return first_text_difference

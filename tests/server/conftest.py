"""A real uvicorn server on a free loopback port, over a tiny random-weight Llama."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carpool import LLM
from carpool.server import ServerConfig
from helpers.hf_models import tiny_llama_dir
from helpers.inproc_server import InProcessServer

MODEL_NAME = "tiny-llama"


# The harness every test folder shares; tests/server know it by this name.
LiveServer = InProcessServer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory, "srv", MODEL_NAME)


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

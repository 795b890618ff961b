"""Fixtures for engine tests: tiny model directories with their transformers reference."""

from __future__ import annotations

import pytest

from helpers.hf_models import save_tiny_model_dir
from helpers.tiny import TinyModel


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory) -> TinyModel:
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf = save_tiny_model_dir(request.param, d)
    return TinyModel(request.param, d, hf)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyModel:
    d = tmp_path_factory.mktemp("tiny-llama-only")
    hf = save_tiny_model_dir("llama", d)
    return TinyModel("llama", d, hf)

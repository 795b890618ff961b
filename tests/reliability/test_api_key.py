"""The API key off the command line (issue 15, item 7): from ``CARPOOL_API_KEY`` or a file.

``--api-key`` shows the key to anyone who lists processes; ``carpool serve`` also reads it from
the environment variable ``CARPOOL_API_KEY`` and from ``--api-key-file PATH``. Precedence:
``--api-key``, then ``--api-key-file``, then the variable; the two flags exclude each other;
the key is never printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from carpool.server.config import API_KEY_ENV, ServerConfig, resolve_api_key
from helpers.cli_server import CliServer

BODY = {"model": "carpool-default", "prompt": "hello", "max_tokens": 2}


def _status(url: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{url}/v1/completions", json=BODY, headers=headers, timeout=30).status_code


def _serve(tmp_path: Path, flags: list[str], env: dict[str, str]) -> tuple[CliServer, str]:
    cli = CliServer(["--model", "embedded", *flags], tmp_path / "serve.log", env=env)
    try:
        return cli, cli.wait_ready()
    except BaseException:
        cli.stop()
        raise


@pytest.mark.slow
def test_key_from_the_environment(tmp_path):
    key = "env-key-5d1f"
    cli, url = _serve(tmp_path, [], {API_KEY_ENV: key})
    try:
        assert _status(url, None) == 401
        assert _status(url, "wrong") == 401
        assert _status(url, key) == 200
        assert httpx.get(f"{url}/health").status_code == 200  # stays open
    finally:
        assert cli.stop() == 0
    assert key not in cli.text()


@pytest.mark.slow
def test_key_from_a_file_wins_over_the_environment(tmp_path):
    key, env_key = "file-key-93ab", "env-key-unused"
    path = tmp_path / "key.txt"
    path.write_text(f"  {key}\n")  # surrounding whitespace and the newline are not the key
    cli, url = _serve(tmp_path, ["--api-key-file", str(path)], {API_KEY_ENV: env_key})
    try:
        assert _status(url, None) == 401
        assert _status(url, env_key) == 401
        assert _status(url, key) == 200
    finally:
        assert cli.stop() == 0
    assert key not in cli.text() and env_key not in cli.text()


def _carpool_serve(*flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carpool.cli", "serve", "--model", "embedded", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--api-key", "flag-secret", "--api-key-file", "FILE"], {}, "not both"),
        (["--api-key-file", "MISSING"], {}, "cannot read the API key file"),
        (["--api-key-file", "EMPTY"], {}, "must hold one non-empty line"),
        ([], {API_KEY_ENV: "  "}, f"{API_KEY_ENV} is set but empty"),
    ],
)
def test_bad_key_options_are_one_line_errors(tmp_path, flags, env, message):
    (tmp_path / "FILE").write_text("secret-in-file\n")
    (tmp_path / "EMPTY").write_text("\n")
    flags = [str(tmp_path / f) if f in ("FILE", "MISSING", "EMPTY") else f for f in flags]
    proc = _carpool_serve(*flags, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "secret-in-file" not in proc.stderr and "flag-secret" not in proc.stderr


def test_precedence_and_the_key_never_in_the_config_repr(tmp_path):
    path = tmp_path / "key"
    path.write_text("from-file\n")
    env = {API_KEY_ENV: "from-env"}
    assert resolve_api_key(ServerConfig(api_key="from-flag"), env).api_key == "from-flag"
    from_file = resolve_api_key(ServerConfig(api_key_file=str(path)), env)
    assert from_file.api_key == "from-file" and from_file.api_key_file is None
    assert resolve_api_key(ServerConfig(), env).api_key == "from-env"
    assert resolve_api_key(ServerConfig(), {}).api_key is None
    assert resolve_api_key(ServerConfig()).api_key is None  # no environment: no variable read
    assert "from-flag" not in repr(ServerConfig(api_key="from-flag"))
    assert "from-file" not in repr(from_file)

"""``carpool bench`` modes as real subcommands (the real process): own flags, errors for the
others', a PNG from ``bench serve --plot``, a non-zero exit when every request failed."""

from __future__ import annotations

import socket
import subprocess
import sys

from helpers.fake_openai import fake_openai_app
from helpers.live_server import UvicornThread


def _carpool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carpool.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_a_flag_of_another_mode_is_an_error_not_a_local_sweep():
    # The mistake of issue 12: `serve` forgotten; it used to start a 1h37m local sweep.
    proc = _carpool("bench", "--url", "http://127.0.0.1:1", "--num-prompts", "4")
    assert proc.returncode == 2 and "each mode has its own flags" in proc.stderr
    proc = _carpool("bench", "--num-prompts")
    assert proc.returncode == 2 and "unrecognized arguments: --num-prompts" in proc.stderr
    proc = _carpool("bench", "strategies", "--batch-sizes", "1,2")
    assert proc.returncode == 2 and "unrecognized arguments: --batch-sizes" in proc.stderr
    proc = _carpool("bench", "serve", "--workload", "fixed")
    assert proc.returncode == 2 and "unrecognized arguments: --workload" in proc.stderr


def test_each_mode_has_its_own_help():
    serve = _carpool("bench", "serve", "--help").stdout
    strategies = _carpool("bench", "strategies", "--help").stdout
    assert "--request-rate" in serve and "--max-num-seqs" not in serve  # no engine flags
    assert "--strategies" in strategies and "--request-rate" not in strategies
    assert "--batch-sizes" not in serve + strategies


def test_bench_serve_against_a_dead_url_fails():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    proc = _carpool("bench", "serve", "--url", f"http://127.0.0.1:{port}", "--num-prompts", "3")
    assert proc.returncode == 1
    assert "every request failed" in proc.stderr


def test_bench_serve_plot_writes_a_png_and_no_httpx_lines(tmp_path):
    server = UvicornThread(fake_openai_app("ok"))
    try:
        png = tmp_path / "serve.png"
        proc = _carpool(
            "bench", "serve", "--url", server.url, "--num-prompts", "12", "--prompt-len", "4",
            "--gen-len", "3", "--plot", str(png),
        )  # fmt: skip
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HTTP Request:" not in proc.stderr  # httpx's per-request INFO lines are silenced

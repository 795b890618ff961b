"""``carpool serve`` in a subprocess: SIGTERM during a stream lets it finish, then exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

MODEL = "tiny-llama"


@pytest.mark.slow
def test_sigterm_finishes_inflight_stream_and_exits_0(tiny_dir, tmp_path):
    log = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "carpool.cli",
                "serve",
                "--model",
                str(tiny_dir),
                "--port",
                "0",
                "--dtype",
                "float32",
                "--shutdown-grace",
                "60",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            url = m.group(1) if m else None
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert url, log.read_text()
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {
                "model": MODEL,
                "prompt": "hello",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60), log.read_text()
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = log.read_text()
    assert "received SIGTERM" in text
    # The signal arrived while the request was still generating.
    assert text.index("received SIGTERM") < text.index("generated_tokens=400")
    assert re.search(r"generated_tokens=400 .*finish_reason=length", text), text[-2000:]

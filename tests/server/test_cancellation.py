"""Disconnects abort requests; deadlines end them with a clear error; blocks come back."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from carpool.server import ServerConfig

MODEL = "tiny-llama"
# The tiny model decodes its 1,000 tokens in ~0.3-1 s depending on the machine's speed: each
# deadline or disconnect below comes well before that (0.3 s did not on a fast minute).
SHORT = 0.05
LONG = {
    "model": MODEL,
    "prompt": "def fibonacci(n):",
    "max_tokens": 1000,
    "ignore_eos": True,
    "temperature": 0,
}


def _assert_all_blocks_free(server) -> None:
    s = server.wait_idle()
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert s["num_free_blocks"] == s["num_blocks"], s
    server.engine.block_manager.check_integrity()


def test_streaming_disconnect_aborts(server):
    before = server.stats()["generation_tokens"]
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", f"{server.base_url}/completions", json=LONG | {"stream": True}) as r,
    ):
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got == 3:
                    break  # leave mid-stream: closing the response drops the connection
    s = server.wait_idle(timeout=20)
    assert s["generation_tokens"] - before < 1000, "the request ran to its end: not aborted"
    _assert_all_blocks_free(server)


def test_non_streaming_disconnect_aborts(server):
    before = server.stats()["generation_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/completions", json=LONG, timeout=httpx.Timeout(30, read=SHORT)
        )
    s = server.wait_idle(timeout=20)
    assert s["generation_tokens"] - before < 1000, "the request ran to its end: not aborted"
    _assert_all_blocks_free(server)


def test_per_request_timeout_non_streaming(server):
    r = httpx.post(f"{server.base_url}/completions", json=LONG | {"timeout": SHORT}, timeout=30)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert "timed out" in err["message"] and err["code"] == "request_timeout"
    _assert_all_blocks_free(server)


def test_per_request_timeout_streaming(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    chunks = 0
    with pytest.raises(openai.APIError) as e:
        for _ in client.completions.create(
            model=MODEL,
            prompt="hello",
            max_tokens=1000,
            stream=True,
            extra_body={"ignore_eos": True, "timeout": SHORT},
        ):
            chunks += 1
    assert "timed out" in str(e.value.message)
    assert chunks < 1000
    _assert_all_blocks_free(server)


def test_server_request_timeout(make_server):
    srv = make_server(ServerConfig(request_timeout=SHORT))
    with httpx.stream(
        "POST",
        f"{srv.base_url}/chat/completions",
        timeout=30,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "timed out" in err["message"]
    r = httpx.post(f"{srv.base_url}/completions", json=LONG, timeout=30)
    assert r.status_code == 504
    _assert_all_blocks_free(srv)
    # A short request still succeeds on the same server (its own deadline: a loaded machine
    # may take longer than SHORT even for two tokens).
    short = LONG | {"max_tokens": 2, "timeout": 30}
    r = httpx.post(f"{srv.base_url}/completions", json=short, timeout=30)
    assert r.status_code == 200, r.text

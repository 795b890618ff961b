"""Server operations: --max-queue counts only what the engine cannot admit now; one access log
line per request (4xx included); a request id on every response and in every error body."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from carpool.server import ServerConfig

MODEL = "tiny-llama"


def test_a_burst_within_the_free_slots_is_not_a_queue(make_server):
    srv = make_server(ServerConfig(max_queue=2), max_num_seqs=64)
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/completions", json=body) for _ in range(8)))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 8


def _access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "carpool.access"]


def test_request_id_header_error_body_and_access_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="carpool.access"):
        ok = httpx.get(f"{server.base_url}/models", timeout=10)
        mine = httpx.get(
            f"{server.base_url}/models", headers={"X-Request-Id": "client-42"}, timeout=10
        )
        bad = httpx.post(f"{server.base_url}/completions", json={"model": MODEL}, timeout=10)
        insane = httpx.get(
            f"{server.base_url}/models", headers={"X-Request-Id": "a b\tc" * 40}, timeout=10
        )
        # The server's thread logs a request after its response is sent: the last line may
        # still be on its way when the client has the answer.
        deadline = time.monotonic() + 5
        while len(_access_lines(caplog)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 32
    assert mine.headers["x-request-id"] == "client-42"
    assert insane.headers["x-request-id"] != "a b\tc" * 40  # replaced, never echoed
    assert bad.status_code == 400
    rid = bad.headers["x-request-id"]
    assert bad.json()["error"]["request_id"] == rid
    assert bad.json()["error"]["param"] == "prompt"  # the body keeps its OpenAI shape
    lines = _access_lines(caplog)
    assert any('"GET /v1/models" 200' in s and "request_id=client-42" in s for s in lines)
    assert any('"POST /v1/completions" 400' in s and f"request_id={rid}" in s for s in lines)
    assert len(lines) == 4


def test_guard_errors_carry_the_request_id(make_server):
    srv = make_server(ServerConfig(api_key="secret"))
    r = httpx.get(f"{srv.base_url}/models", headers={"X-Request-Id": "r-1"}, timeout=10)
    assert r.status_code == 401
    assert r.headers["x-request-id"] == "r-1" and r.json()["error"]["request_id"] == "r-1"
    assert int(r.headers["content-length"]) == len(r.content)

"""A client that does not read its stream costs the server a bounded amount, then is cut off.

Issue 15 item 4: ``n=16``, ``logprobs=20``, hundreds of tokens, the client reading nothing made
the server buffer the whole stream. Now a stream's unread output is bounded
(``--max-stream-backlog``, default 1 MiB of events): past it the request is aborted (KV blocks
freed, counted as an abort), the response abandoned and the connection closed, while other
clients are served as usual.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from carpool.engine.stream import RequestStream, StreamBacklogError
from carpool.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from carpool.server.streaming import SSEResponse, sse
from helpers.cli_server import CliServer

pytestmark = pytest.mark.slow

MAX_TOKENS = 900  # the embedded model's context is 1024
# A stream of this shape is ~12 MB of events. The server keeps at most ~1 MiB of it (the default
# bound) as Python objects (~3x that), plus socket buffers and what serving a request of this
# shape next to others allocates: measured +15 MiB. Before the bound, +47 MiB and rising (the
# whole stream kept, and the request ran to its end).
RSS_GROWTH_BOUND_MIB = 24


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def aborted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r'^carpool:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$',
                  text, re.M)  # fmt: skip
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CliServer, str]]:
    log = tmp_path_factory.mktemp("slow") / "server.log"
    srv = CliServer(["--model", "embedded", "--kv-cache-memory", "64MiB"], log)
    try:
        yield srv, srv.wait_ready()
    finally:
        srv.stop()


def big_stream(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": MAX_TOKENS,
        "n": 16,
        "logprobs": 20,
        "stream": True,
        "ignore_eos": True,
        "temperature": 1.0,
    }


def test_non_reading_client_is_cut_off_and_costs_bounded_memory(
    server: tuple[CliServer, str],
) -> None:
    srv, url = server
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = big_stream(model)
    # The engine's buffers grown to this shape (16 sequences of 900 tokens), then a client that
    # reads a tenth of such a stream: its size.
    plain = body | {"stream": False, "logprobs": None}
    # The KV cache's pages become resident as its blocks are first written, and freed blocks go
    # to the back of the free list: three requests of this shape (912 blocks each) cycle through
    # all 2,048 blocks of the 64 MiB cache, so the request measured below touches no new page.
    for _ in range(3):
        assert httpx.post(f"{url}/v1/completions", json=plain, timeout=300).status_code == 200
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body | {"max_tokens": 90}, timeout=120
    ) as r:
        full = sum(len(c) for c in r.iter_bytes()) * MAX_TOKENS // 90
    assert full > 8 * 2**20, f"the stream is only ~{full} bytes: too small to show the bound"
    before, aborts = rss_mib(srv.proc.pid), aborted(url)

    # The client: sends its request, then reads nothing (small receive buffer: the kernel
    # holds little for it either).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    try:
        # Other clients are served meanwhile.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)
        for _ in range(3):
            out = client.completions.create(model=model, prompt="Hello", max_tokens=8)
            assert out.choices[0].finish_reason in ("length", "stop")
        peak = before
        deadline = time.monotonic() + 120
        while aborted(url) < aborts + 1:
            peak = max(peak, rss_mib(srv.proc.pid))
            assert time.monotonic() < deadline, (
                f"the non-reading client's request never aborted (server RSS +{peak - before:.0f}"
                " MiB so far)"
            )
            time.sleep(0.1)
        stats = httpx.get(f"{url}/v1/stats").json()
        deadline = time.monotonic() + 30
        while stats["num_unfinished"] or stats["num_free_blocks"] != stats["num_blocks"]:
            assert time.monotonic() < deadline, f"KV blocks not freed: {stats}"
            time.sleep(0.1)
            stats = httpx.get(f"{url}/v1/stats").json()
        peak = max(peak, rss_mib(srv.proc.pid))
        print(f"server RSS +{peak - before:.1f} MiB for a non-reading client of a ~{full} B stream")
        assert peak - before < RSS_GROWTH_BOUND_MIB, (
            f"server RSS grew {peak - before:.0f} MiB for one non-reading client "
            f"(bound {RSS_GROWTH_BOUND_MIB} MiB, stream {full / 2**20:.1f} MiB)"
        )
        # The server gave up on the response and closed the connection: reading now drains
        # what the sockets held, then meets the end of the stream, well short of the whole.
        sock.settimeout(30)
        got = 0
        while chunk := sock.recv(1 << 16):
            got += len(chunk)
        assert got < full / 2, f"received {got} of ~{full} bytes: the stream was not cut off"
        assert "fell" in srv.text() and "behind its stream" in srv.text()
    finally:
        sock.close()


# ---- the bound itself, without a server -----------------------------------------------------


def _output(step: int, n: int = 4, top: int = 20) -> RequestOutput:
    lps = [TokenLogprobs(7, -0.5, [(t, -1.0) for t in range(top)])]
    outs = [
        CompletionOutput(i, " w", [7], None, logprobs=lps, delta_text=" w", delta_token_ids=[7])
        for i in range(n)
    ]
    return RequestOutput("r", None, [1, 2], outs, finished=False)


def test_stream_backlog_is_bounded_and_the_consumer_sees_the_error() -> None:
    async def run() -> tuple[list[str], int, int]:
        aborts: list[str] = []
        stream = RequestStream("r", aborts.append)
        stream.max_backlog = 20_000
        for step in range(100):  # nobody reads: far more than the bound
            stream.put(_output(step))
        queued = stream._queue.qsize()
        got = 0
        with pytest.raises(StreamBacklogError) as e:
            async for _ in stream:
                got += 1
        assert e.value.code == "stream_backlog_exceeded"
        stream.abort()  # the consumer's own abort after the error: not a second engine abort
        return aborts, queued, got

    aborts, queued, got = asyncio.run(run())
    assert aborts == ["r"]
    assert queued == 1 and got == 0  # what waited was dropped; only the error remains


def test_a_consumer_that_keeps_up_is_never_cut_off() -> None:
    async def run() -> int:
        stream = RequestStream("r", lambda rid: pytest.fail(f"{rid} aborted"))
        stream.max_backlog = 20_000
        got = 0
        for step in range(200):
            stream.put(_output(step))
            async for _ in stream:
                got += 1
                break
        return got

    assert asyncio.run(run()) == 200


def _scope() -> dict[str, Any]:
    return {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "headers": []}


async def _events(stream: RequestStream) -> AsyncIterator[str]:
    try:
        async for out in stream:
            yield sse({"n": len(out.outputs)})
    except StreamBacklogError as e:
        yield sse({"error": {"code": e.code}})
    yield sse("[DONE]")


def test_sse_response_sends_the_error_event_to_a_client_that_still_reads() -> None:
    async def run() -> tuple[bytes, list[str]]:
        aborts: list[str] = []
        stream = RequestStream("r", aborts.append)
        sent: list[bytes] = []
        gate = asyncio.Event()  # the client reads nothing until the cut-off

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await gate.wait()
                sent.append(message.get("body", b""))

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # never disconnects
            return {}

        resp = SSEResponse(_events(stream), lambda: None, [stream], max_backlog=20_000)
        task = asyncio.ensure_future(resp(_scope(), receive, send))
        for step in range(100):
            stream.put(_output(step))
            await asyncio.sleep(0)
        await stream.cut_off.wait()
        gate.set()  # the client reads again, within the grace
        await asyncio.wait_for(task, 5)
        return b"".join(sent), aborts

    body, aborts = asyncio.run(run())
    assert aborts == ["r"]
    assert body.endswith(
        b'data: {"error": {"code": "stream_backlog_exceeded"}}\n\ndata: [DONE]\n\n'
    )


def test_sse_response_gives_up_on_a_client_that_reads_nothing() -> None:
    async def run() -> tuple[float, list[str]]:
        closed: list[str] = []
        stream = RequestStream("r", lambda rid: None)

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # the socket is full for good

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        resp = SSEResponse(_events(stream), lambda: closed.append("r"), [stream], 20_000)
        task = asyncio.ensure_future(resp(_scope(), receive, send))
        for step in range(100):
            stream.put(_output(step))
            await asyncio.sleep(0)
        start = time.monotonic()
        await asyncio.wait_for(task, SSEResponse.CUT_OFF_GRACE + 5)
        return time.monotonic() - start, closed

    waited, closed = asyncio.run(run())
    assert closed == ["r"]  # the response ended (uvicorn then closes the connection)
    assert waited <= SSEResponse.CUT_OFF_GRACE + 1

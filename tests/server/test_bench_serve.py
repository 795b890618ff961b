"""``carpool bench serve``: against a fake OpenAI-compatible server and a live carpool server."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from carpool.bench.serve_load import (
    LoadSpec,
    arrival_times,
    load_dataset,
    run_load,
    synthetic_prompts,
)
from carpool.bench.serve_summary import parse_goodput, percentile, summarize
from carpool.cli import main
from helpers.fake_openai import fake_openai_app
from helpers.live_server import UvicornThread


class _Server(UvicornThread):
    """The fake server, started."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(app, graceful_shutdown=None, backlog=128)
        self.wait_started()

    def stop(self, timeout: float = 10) -> None:
        super().stop(timeout)


@pytest.fixture
def fake() -> Iterator:
    made: list[_Server] = []

    def make(mode: str) -> _Server:
        s = _Server(fake_openai_app(mode))
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _spec(url: str, **kw: object) -> LoadSpec:
    return LoadSpec(url=url, model="fake-model", seed=0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("include_usage", [True, False])
def test_fake_server_zero_failures_and_consistent_counts(fake, include_usage):
    server = fake("ok")
    prompts = synthetic_prompts(20, 8, 6, seed=1)
    spec = _spec(server.url, request_rate=200.0, max_concurrency=4, include_usage=include_usage)
    results, duration = asyncio.run(run_load(spec, prompts))
    s = summarize(results, duration, parse_goodput("ttft:10000,tpot:10000,e2el:60000"))
    assert s["failed"] == 0 and s["completed"] == 20 == s["num_requests"]
    assert s["failures"] == {}
    # Each fake answer has exactly max_tokens tokens, counted from usage or from the chunks.
    assert s["total_output_tokens"] == sum(p.max_tokens for p in prompts)
    assert [r.output_tokens for r in results] == [p.max_tokens for p in prompts]
    assert s["total_prompt_tokens"] == (60 if include_usage else None)
    assert s["good_requests"] == 20 and s["goodput"] == pytest.approx(20 / duration)
    assert s["request_throughput"] == pytest.approx(20 / duration)
    for key in ("ttft_ms", "e2el_ms"):
        assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert sum(len(r.itl) for r in results) == sum(p.max_tokens - 1 for p in prompts)


def test_fake_server_errors_are_counted_not_raised(fake, tmp_path):
    server = fake("errors")
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--url", server.url, "--num-prompts", "30"]
    argv += ["--request-rate", "inf", "--prompt-len", "4", "--gen-len", "3"]
    argv += ["--goodput", "ttft:60000", "--output", str(out)]
    assert main(argv) == 0
    s = json.loads(out.read_text())
    assert s["model"] == "fake-model"  # read from /v1/models
    assert s["num_requests"] == 30 == s["completed"] + s["failed"]
    assert s["failures"] == {"http_500": 10, "http_429": 4}  # multiples of 3; of 5 but not 15
    assert s["completed"] == 16 and s["good_requests"] == 16


def test_timeouts_truncation_and_refused_connections_are_counted(fake):
    prompts = synthetic_prompts(3, 4, 3, seed=0)
    slow = fake("slow")
    results, _ = asyncio.run(run_load(_spec(slow.url, timeout=0.3), prompts))
    assert [r.error for r in results] == ["timeout"] * 3
    cut = fake("truncated")
    results, _ = asyncio.run(run_load(_spec(cut.url), prompts))
    assert [r.error for r in results] == ["incomplete"] * 3
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    results, duration = asyncio.run(run_load(_spec(f"http://127.0.0.1:{port}"), prompts))
    assert summarize(results, duration)["failures"] == {"connection": 3}


def test_arrivals_lengths_and_dataset(tmp_path):
    times = arrival_times(2000, 4.0, seed=0)
    assert times == arrival_times(2000, 4.0, seed=0) and times[0] == 0
    assert 2000 / times[-1] == pytest.approx(4.0, rel=0.1)
    assert arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]
    prompts = synthetic_prompts(500, 32, 16, seed=0)
    outs = [p.max_tokens for p in prompts]
    assert min(outs) >= 1 and max(outs) <= 64 and percentile(outs, 50) == pytest.approx(16, rel=0.2)
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hello", "max_tokens": 5}\n\n{"text": "bye"}\n')
    loaded = load_dataset(data, 5, 16, seed=0)
    assert [p.prompt for p in loaded] == ["hello", "bye", "hello", "bye", "hello"]
    assert loaded[0].max_tokens == 5 and loaded[1].max_tokens >= 1
    with pytest.raises(ValueError, match="goodput metric"):
        parse_goodput("latency:5")


def test_live_carpool_server(server, tmp_path):
    """The real server on a loopback port: no failures, token counts as asked (EOS ignored)."""
    out = tmp_path / "live.json"
    argv = ["bench", "serve", "--url", server.url, "--num-prompts", "12", "--request-rate", "50"]
    argv += ["--max-concurrency", "6", "--prompt-len", "4", "--gen-len", "4", "--ignore-eos"]
    argv += ["--seed", "3", "--goodput", "ttft:600000,tpot:600000", "--output", str(out)]
    assert main(argv) == 0
    s = json.loads(out.read_text())
    assert s["failed"] == 0 and s["completed"] == 12, s["failures"]
    expected = sum(p.max_tokens for p in synthetic_prompts(12, 4, 4, seed=3))
    assert s["total_output_tokens"] == expected
    assert s["total_prompt_tokens"] > 0  # the server honoured stream_options.include_usage
    assert s["good_requests"] == 12
    assert s["output_throughput"] == pytest.approx(expected / s["duration_s"])
    httpx.get(f"{server.url}/health", timeout=5).raise_for_status()

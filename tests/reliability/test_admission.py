"""Admission counts sequences, not requests (issue 15, item 6).

``--max-queue 64`` once admitted one request of 50 prompts x n=128 (6,400 sequences), and with
default flags a 2 KB request of 200 prompts x n=128 (25,600 sequences) was accepted while a
4-token request sent a second later waited 11-14 s. Now one request may ask for at most
``--max-seqs-per-request`` sequences (prompts x n; 256 by default), ``--max-queue`` counts
sequences, and the event loop never waits on the engine thread, so ``/v1/stats`` and
``/health`` answer while a large request is admitted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.engine.core import EngineCore, NewRequest
from carpool.engine.llm_engine import LLMEngine
from carpool.server import ServerConfig
from helpers.hf_models import save_tiny_model_dir
from helpers.inproc_server import InProcessServer

MODEL = "tiny-llama"
ANSWER_BOUND_S = 5.0  # the issue saw no answer within 5 s; generous on a shared, noisy CI machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("admission") / MODEL
    d.mkdir()
    save_tiny_model_dir("llama", d)
    return d


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[InProcessServer]:
    s = InProcessServer(model_dir)  # default flags: at most 256 sequences per request
    yield s
    s.stop()


def post(srv: InProcessServer, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/completions", json={"model": MODEL} | body, timeout=timeout)


SMALL = {"prompt": "hello", "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize(
    ("prompt", "n", "param"),
    [
        (["tell me a story"] * 200, 128, "n"),  # the 25,600 sequences
        ([[5, 6, 7]] * 300, 1, "prompt"),  # 300 prompts of token ids
        (["a b"] * 129, 2, "n"),  # 258: just over
    ],
)
def test_oversized_request_is_a_400_while_a_small_one_is_served(server, prompt, n, param) -> None:
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, server, {"prompt": prompt, "n": n, "max_tokens": 16})
        time.sleep(0.05)
        t0 = time.monotonic()
        small = post(server, SMALL)
        small_s = time.monotonic() - t0
        resp = big.result()
    assert resp.status_code == 400, resp.text[:300]
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    num_seqs = len(prompt) * n
    assert f"= {num_seqs} sequences" in err["message"] and "256" in err["message"], err
    assert "--max-seqs-per-request" in err["message"]
    assert small.status_code == 200, small.text
    assert small_s < ANSWER_BOUND_S, f"the small request took {small_s:.1f} s"
    assert server.wait_idle()["num_free_blocks"] == server.stats()["num_blocks"]


def test_request_at_the_ceiling_is_served(server) -> None:
    r = post(server, {"prompt": ["a", "b"], "n": 128, "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 256


def test_chat_n_counts_against_the_ceiling(model_dir) -> None:
    srv = InProcessServer(model_dir, ServerConfig(max_seqs_per_request=4))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{srv.base_url}/chat/completions", json=body | {"n": 5}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        r = httpx.post(f"{srv.base_url}/chat/completions", json=body | {"n": 4}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
    finally:
        srv.stop()


def test_max_queue_counts_sequences(model_dir) -> None:
    """max_queue 4 with 4 seats: sequences beyond the free seats count against the queue."""
    srv = InProcessServer(model_dir, ServerConfig(max_queue=4), max_num_seqs=4)
    try:
        # 2 prompts x n 8 = 16 can never be taken (4 queued + 4 seats): 400, not a 429 that
        # no retry would clear.
        r = post(srv, {"prompt": ["a", "b"], "n": 8, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text[:300]
        assert "--max-queue" in r.json()["error"]["message"]
        r = post(srv, {"prompt": "a", "n": 8, "max_tokens": 2})  # 8 - 4 seats = 4 queued
        assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text[:300]
        # With every seat taken by a running stream, 5 more sequences are 5 queued: 429.
        body = {"model": MODEL, "prompt": "a", "n": 4, "max_tokens": 400, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{srv.base_url}/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            r = post(srv, {"prompt": "a", "n": 5, "max_tokens": 2})
            assert r.status_code == 429, r.text[:300]
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            r = post(srv, {"prompt": "a", "n": 4, "max_tokens": 2})  # 4 queued: admitted
            assert r.status_code == 200, r.text[:300]
        srv.wait_idle()
    finally:
        srv.stop()


def test_inbox_counts_sequences(model_dir) -> None:
    """Requests in the core's inbox count their n (what ``max_queue`` is compared with)."""
    core = EngineCore(LLMEngine(EngineConfig(model=str(model_dir), dtype="float32")))
    core.add_request(NewRequest.at(0.0, "a", [1, 2], SamplingParams(n=5), None, None))
    core.add_request(NewRequest.at(0.0, "b", [1, 2], SamplingParams(), None, None))
    assert core.num_pending_adds == 6
    step = core.step()  # takes the inbox
    assert step is not None and core.num_pending_adds == 0


@pytest.mark.slow
def test_stats_and_health_answer_while_a_large_request_is_admitted(model_dir) -> None:
    srv = InProcessServer(model_dir, ServerConfig(max_seqs_per_request=20_000))
    try:
        result: dict[str, Any] = {}

        def big() -> None:
            body = {"prompt": ["tell me a story"] * 100, "n": 128, "max_tokens": 2}
            result["resp"] = post(srv, body, timeout=240)

        th = threading.Thread(target=big)
        th.start()
        worst = {"stats": 0.0, "health": 0.0}
        seen_busy = False
        while th.is_alive():
            for name, url in (("stats", f"{srv.base_url}/stats"), ("health", f"{srv.url}/health")):
                t0 = time.monotonic()
                r = httpx.get(url, timeout=30)
                worst[name] = max(worst[name], time.monotonic() - t0)
                assert r.status_code == 200, r.text
                if name == "stats":
                    seen_busy |= r.json()["num_unfinished"] > 0
            time.sleep(0.1)
        th.join()
        assert result["resp"].status_code == 200, result["resp"].text[:300]
        assert len(result["resp"].json()["choices"]) == 12_800
        assert seen_busy, "never saw the large request in flight"
        assert max(worst.values()) < ANSWER_BOUND_S, worst
        srv.wait_idle()
    finally:
        srv.stop()

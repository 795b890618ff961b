"""Replicas: the routers alone, then 2 replica processes behind the real HTTP server.

The server tests share one 2-replica server (starting two processes costs seconds on a small
machine); the test that kills a replica runs last in the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.errors import ContextLengthError, RequestTimeoutError
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.replicas import (
    Candidate,
    LeastLoadedRouter,
    LoadWeights,
    PowerOfTwoRouter,
    ReplicaPool,
    ReplicaPoolConfig,
    RoundRobinRouter,
    make_router,
)
from carpool.replicas.messages import (
    LoadReport,
    RequestFailed,
    StepReport,
    SubmitRequest,
)
from carpool.server import ServerConfig, build_app
from carpool.server.dashboard_wire import merge_frame
from helpers.live_server import UvicornThread
from helpers.metrics import scrape

MODEL = "tiny-llama"

# ---- routers (no processes) -----------------------------------------------------------------


def test_least_loaded_takes_the_lowest_score_and_counts_in_transit():
    router = LeastLoadedRouter()
    busy = Candidate(0, num_running=3)
    idle = Candidate(1)
    assert all(router.choose([busy, idle]) == 1 for _ in range(5))
    # requests in transit count as waiting (x2): 2 in transit outweigh 3 running
    assert router.choose([busy, Candidate(1, in_transit=2)]) == 0
    # a full KV cache weighs like 4 running requests
    assert router.choose([Candidate(0, kv_cache_usage=1.0), Candidate(1, num_running=3)]) == 1


def test_least_loaded_breaks_ties_in_turn():
    router = LeastLoadedRouter()
    picks = [router.choose([Candidate(0), Candidate(1), Candidate(2)]) for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_round_robin_ignores_load():
    router = RoundRobinRouter()
    picks = [router.choose([Candidate(0, num_running=50), Candidate(1)]) for _ in range(4)]
    assert picks == [0, 1, 0, 1]


def test_power_of_two_takes_the_lighter_of_two():
    router = PowerOfTwoRouter(seed=0)
    cands = [Candidate(0, num_waiting=9), Candidate(1, num_waiting=9), Candidate(2)]
    picks = [router.choose(cands) for _ in range(200)]
    # replica 2 is picked whenever it is sampled (2 of 3 pairs contain it)
    assert 100 < picks.count(2) < 180
    assert router.choose([Candidate(5)]) == 5


def test_weights_and_factory():
    w = LoadWeights(running=1, waiting=2, kv_cache_usage=4)
    assert w.score(Candidate(0, 1, 2, 3, 0.5)) == 1 + 2 * 5 + 2
    assert make_router("round-robin").name == "round-robin"
    with pytest.raises(ValueError, match="unknown routing"):
        make_router("random")
    with pytest.raises(ValueError, match="num_replicas"):
        ReplicaPoolConfig(EngineConfig(), num_replicas=0)


def test_messages_pickle():
    out = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "hi", [5], "stop")], True)
    report = StepReport(
        replica=1,
        load=LoadReport(num_running=2, num_received=3),
        outputs=[out],
        failed=[RequestFailed("x", RequestTimeoutError("late").info())],
        finished=[(out, "stop")],
    )
    back = pickle.loads(pickle.dumps(report))
    assert back == report
    error = back.failed[0].error.to_exception()
    assert type(error) is RequestTimeoutError and error.code == "request_timeout"
    assert error.message == "late" and error.status == 504
    # An error keeps its structure (param, code) across the pipe, never parsed from text.
    e = pickle.loads(pickle.dumps(ContextLengthError("too long", param="max_tokens")))
    assert (type(e), e.param, e.code) == (
        ContextLengthError,
        "max_tokens",
        "context_length_exceeded",
    )
    msg = SubmitRequest("r", [1, 2], SamplingParams(max_tokens=3), 1.0, 2.0, 1.0)
    assert pickle.loads(pickle.dumps(msg)) == msg


# ---- a 2-replica server ---------------------------------------------------------------------


class PoolServer(UvicornThread):
    """``build_app(ReplicaPool)`` served by uvicorn in a background thread."""

    def __init__(self, model_dir: Path, **pool_args: Any) -> None:
        engine = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=8 << 20)
        pool_args.setdefault("threads_per_replica", 1)
        pool_args.setdefault("restart_backoff", 0.2)
        self.pool = ReplicaPool(ReplicaPoolConfig(engine, num_replicas=2, **pool_args))
        self.app = build_app(self.pool, ServerConfig())
        super().__init__(self.app)
        self.wait_health(lambda h: h["status"] == "ok", 240)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_health(self, ok: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if ok(last):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"health condition not met in {timeout}s: {last}")

    def routed(self) -> list[int]:
        return [r["routed"] for r in self.health()["replicas"]]

    def on_loop(self, coro: Any, timeout: float = 120) -> Any:
        """Run ``coro`` on the server's event loop (the pool is not thread-safe)."""
        assert self.pool._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.pool._loop).result(timeout)

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)


@pytest.fixture(scope="module")
def pool_server(tiny_dir) -> Iterator[PoolServer]:
    s = PoolServer(tiny_dir)
    yield s
    s.stop()
    assert all(not h.process.is_alive() for h in s.pool.replicas if h.process is not None)


def _client(srv: PoolServer) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=120)
    return openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0, http_client=http)


@pytest.mark.slow
def test_burst_is_shared_and_matches_one_engine(pool_server, reference):
    srv = pool_server
    health = srv.health()
    assert [r["state"] for r in health["replicas"]] == ["ready", "ready"]
    assert len({r["pid"] for r in health["replicas"]}) == 2
    before = srv.routed()
    prompts = [f"Request {i}: " + "word " * (i % 5) for i in range(40)]

    async def one(client: openai.AsyncOpenAI, i: int, prompt: str) -> str:
        if i % 2:
            r = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0
            )
            return r.choices[0].text
        text = ""
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
        return text

    async def main() -> list[str]:
        client = _client(srv)
        try:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    texts = asyncio.run(main())
    expected = reference.generate(
        prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False
    )
    for i, (got, exp) in enumerate(zip(texts, expected, strict=True)):
        assert got == exp.outputs[0].text, f"request {i}"
    shares = [b - a for a, b in zip(before, srv.routed(), strict=True)]
    assert sum(shares) == 40 and min(shares) >= 10, shares

    # chat goes through the same pool
    chat = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=60)
    r = chat.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1

    # per-replica series, and the usual ones summed over the replicas
    m = scrape(srv.url)
    routed = [m[f"carpool:replica_requests_routed_total[('replica', '{i}')]"] for i in (0, 1)]
    assert sum(routed) >= 41 and min(routed) >= 10
    for name in (
        "replica_up",
        "replica_num_requests_running",
        "replica_num_requests_waiting",
        "replica_kv_cache_usage_perc",
    ):
        assert f"carpool:{name}[('replica', '1')]" in m
    assert m["carpool:replica_up[('replica', '0')]"] == 1
    assert m["carpool:request_success_total[('finished_reason', 'length')]"] >= 40
    stats = httpx.get(f"{srv.base_url}/stats").json()
    assert stats["num_blocks"] == stats["num_free_blocks"] > 0


@pytest.mark.slow
def test_least_loaded_avoids_a_busy_replica(pool_server):
    """Pin long requests to replica 0, then send short ones one at a time and count."""
    srv, pool = pool_server, pool_server.pool
    long = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0)

    async def count_short(router: Any) -> list[int]:
        pool.router = router
        longs = [pool.submit([5, 6, 7], long, replica=0) for _ in range(4)]
        try:
            while pool.replicas[0].load.num_running < 4:
                await asyncio.sleep(0.01)
            where = []
            for _ in range(8):
                stream = pool.submit([9, 10, 11], short)
                where.append(pool.flights[stream.request_id].replica)  # routed at submit
                async for _ in stream:
                    pass
            assert pool.replicas[0].load.num_running == 4, "the long requests ended too early"
            return [where.count(0), where.count(1)]
        finally:
            for s in longs:
                s.abort()

    try:
        least = srv.on_loop(count_short(LeastLoadedRouter()))
        robin = srv.on_loop(count_short(RoundRobinRouter()))
    finally:
        pool.router = LeastLoadedRouter()
    assert least == [0, 8], least
    assert robin == [4, 4], robin


def test_a_burst_within_the_free_slots_is_not_a_queue(pool_server):
    """--max-queue counts only what the replicas cannot start now (as AsyncEngine does)."""
    srv, pool = pool_server, pool_server.pool
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/completions", json=body) for _ in range(8)))

    pool.max_queue = 2
    try:
        statuses = [r.status_code for r in asyncio.run(burst())]
    finally:
        pool.max_queue = None
    assert statuses == [200] * 8, statuses


def test_health_shows_each_replica_heartbeat(pool_server):
    """Ready replicas beat (from their own thread) about once a second (the default bound of
    10 s gives 1 s heartbeats); /health shows how long ago, and no hang so far."""
    assert pool_server.pool.config.liveness_timeout == 10.0
    time.sleep(1.5)  # idle replicas: only heartbeats arrive
    h = pool_server.health()
    assert h["status"] == "ok"
    for r in h["replicas"]:
        assert r["hangs"] == 0 and 0 <= r["heartbeat_age"] < 3.0, r


@pytest.mark.slow
def test_dashboard_stream_has_one_lane_per_replica(pool_server):
    """The dashboard sees both replicas: their lanes, requests and KV maps (``Watch``)."""
    seen: list[dict[str, Any]] = []

    def watch() -> None:
        with httpx.stream("GET", f"{pool_server.base_url}/stats/stream", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):  # a keyframe, then deltas on it
                    seen.append(merge_frame(seen[-1] if seen else None, json.loads(line[6:])))
                    if len(seen) >= 400 or stop.is_set():
                        return

    stop = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()

    async def burst() -> None:
        async with _client(pool_server) as client:
            await asyncio.gather(
                # 300 tokens: long enough for 10 frames a second to catch them on a fast machine
                *(client.completions.create(model=MODEL, prompt=f"lane {i}", max_tokens=300,
                                            extra_body={"ignore_eos": True})
                  for i in range(8))
            )  # fmt: skip

    time.sleep(0.5)  # the Watch message reaches both replicas
    asyncio.run(burst())
    time.sleep(0.5)
    stop.set()
    watcher.join(30)
    assert seen, "no frame arrived"
    last = seen[-1]
    assert [lane["replica"] for lane in last["lanes"]] == [0, 1]
    assert all(lane["state"] == "ready" for lane in last["lanes"])
    assert last["config"]["replicas"] == 2 and [k["replica"] for k in last["kv"]] == [0, 1]
    # Both replicas reported their requests (views crossed the pipe) and their steps.
    lanes_with_requests = {r["replica"] for f in seen for r in f["requests"]}
    assert lanes_with_requests == {0, 1}, lanes_with_requests
    assert {s[1] for s in last["steps"]} == {0, 1}
    assert all(lane["recent"] for lane in last["lanes"]), "the router's choices are not shown"


@pytest.mark.slow
def test_killed_replica_fails_fast_and_comes_back(pool_server, reference):
    srv = pool_server
    pid0 = srv.health()["replicas"][0]["pid"]
    prompts = [f"Kill test {i}" for i in range(12)]
    # Long enough that replica 0 is still answering when it is killed: with 200 tokens a Zen 5
    # finished them between the check below and the kill once the decode step got faster.
    max_tokens = 800

    # Requests alternate between the replicas; streams are i = 2, 3, 6, 7, 10, 11 so that
    # each replica serves streams and non-streams.
    def streams(i: int) -> bool:
        return bool((i // 2) % 2)

    streamed: set[int] = set()  # streams that received text

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, Any]:
        body = {
            "model": MODEL,
            "prompt": prompts[i],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": streams(i),
        }
        if not body["stream"]:
            r = await http.post(f"{srv.base_url}/completions", json=body)
            if r.status_code != 200:
                return "error", (r.status_code, r.json()["error"]["code"])
            return "ok", r.json()["choices"][0]["text"]
        text = ""
        async with http.stream("POST", f"{srv.base_url}/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return "error", (r.status_code, r.json()["error"]["code"])
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                import json

                data = json.loads(line[6:])
                if "error" in data:
                    return "error", ("stream", data["error"]["code"])
                text += "".join(c["text"] for c in data["choices"])
                if text:
                    streamed.add(i)
        return "ok", text

    async def kill_when_busy() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r0 = (await asyncio.to_thread(srv.health))["replicas"][0]
            # every stream has sent text: replica 0's streams are mid-answer when it dies
            if r0["load"]["num_running"] > 0 and len(streamed) == 6:
                break
            await asyncio.sleep(0.02)
        os.kill(pid0, signal.SIGKILL)

    async def main() -> list[tuple[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.ensure_future(one(http, i)) for i in range(len(prompts))]
            await kill_when_busy()
            # no request hangs: every one is answered or fails within a bounded time
            return await asyncio.wait_for(asyncio.gather(*tasks), 90)

    start = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - start < 90
    errors = [r for kind, r in results if kind == "error"]
    assert all(code == "replica_unavailable" for _, code in errors), errors
    assert all(status in (503, "stream") for status, _ in errors), errors
    assert errors, "replica 0 was killed mid-load: some of its requests must have failed"
    # A non-streaming request has received nothing before it finishes, so it is retried on
    # the other replica and succeeds; streams that sent text cannot be retried and fail.
    assert all(kind == "ok" for i, (kind, _) in enumerate(results) if not streams(i)), results
    expected = reference.generate(
        prompts,
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    for (kind, text), exp in zip(results, expected, strict=True):
        if kind == "ok":
            assert text == exp.outputs[0].text

    # marked down (or already restarting), then back with a new process
    h = srv.wait_health(lambda h: h["replicas"][0]["state"] == "ready", 180)
    r0 = h["replicas"][0]
    assert r0["pid"] != pid0 and r0["restarts"] == 1, r0
    assert h["status"] == "ok"
    before = srv.routed()

    async def burst() -> list[str]:
        client = _client(srv)
        try:
            rs = await asyncio.gather(
                *(
                    client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
                    for p in prompts[:8]
                )
            )
            return [r.choices[0].text for r in rs]
        finally:
            await client.close()

    texts = asyncio.run(burst())
    short = reference.generate(
        prompts[:8], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False
    )
    assert texts == [e.outputs[0].text for e in short]
    after = srv.routed()
    assert after[0] > before[0], (before, after)  # the restarted replica serves again
    m = scrape(srv.url)
    assert m["carpool:replica_restarts_total[('replica', '0')]"] == 1
    assert m["carpool:replica_up[('replica', '0')]"] == 1

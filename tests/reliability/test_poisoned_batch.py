"""One request can only fail itself (issue 15, item 1).

``top_k`` of 2**63 once overflowed when the sampler built its tensor, and the engine failed
every request of that step with a 500. Now every numeric field is bounded at the edge (400
naming the field) and again in ``SamplingParams``; and if sampling still raises, the engine
samples the batch row by row and fails only the rows that raise. Both are checked on a real
server beside three innocent greedy requests that must get exactly the text each gets alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.structured.processor import LogitsProcessor
from carpool.worker.sampler import Sampler
from helpers.hf_models import tiny_llama_dir
from helpers.inproc_server import InProcessServer

MODEL = "tiny-llama"
INNOCENT_PROMPTS = ["The quick brown", "def main():", "1, 2, 3,"]
INNOCENT_TOKENS = 300  # long enough that the poison arrives while they decode
FAULT_SEED = 424242  # marks the request whose row the injected fault breaks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory, "poison", MODEL)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[InProcessServer]:
    s = InProcessServer(model_dir)
    yield s
    s.stop()


def innocent_body(prompt: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": INNOCENT_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }


@pytest.fixture(scope="module")
def alone(server) -> list[str]:
    """Each innocent prompt's text, served alone."""
    texts = []
    for p in INNOCENT_PROMPTS:
        r = httpx.post(f"{server.base_url}/completions", json=innocent_body(p), timeout=60)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def stream_text(url: str, body: dict[str, Any], started: threading.Event) -> str:
    """The streamed text; an error event is returned as ``ERROR: ...``."""
    text = ""
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
        if r.status_code != 200:
            started.set()
            return f"ERROR: HTTP {r.status_code} {r.read().decode()}"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            started.set()
            if "error" in data:
                return f"ERROR: {data['error']}"
            text += data["choices"][0]["text"]
    return text


def poison_beside_innocents(
    server: InProcessServer, path: str, poison: dict[str, Any]
) -> tuple[httpx.Response, list[str]]:
    """Start the three innocents streaming, send ``poison`` while they decode; both results."""
    url = f"{server.base_url}/completions"
    events = [threading.Event() for _ in INNOCENT_PROMPTS]
    with ThreadPoolExecutor(len(INNOCENT_PROMPTS)) as pool:
        futures = [
            pool.submit(stream_text, url, innocent_body(p), e)
            for p, e in zip(INNOCENT_PROMPTS, events, strict=True)
        ]
        for e in events:
            assert e.wait(30), "an innocent request produced nothing"
        resp = httpx.post(f"{server.base_url}{path}", json=poison, timeout=60)
        texts = [f.result() for f in futures]
    server.wait_idle()
    return resp, texts


def assert_same_text(got: list[str], want: list[str]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            at = next(
                (j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                min(len(g), len(w)),
            )
            raise AssertionError(
                f"innocent request {i} changed at char {at}:\n got: {g!r}\nwant: {w!r}"
            )


def test_alone_texts_are_long(alone) -> None:
    assert all(len(t) > 20 for t in alone), alone


@pytest.mark.parametrize(
    ("path", "poison", "param"),
    [
        ("/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
        ("/completions", {"prompt": "hi", "top_k": 2**80}, "top_k"),
        ("/completions", {"prompt": "hi", "top_k": 2**31}, "top_k"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_k": 2**63},
            "top_k",
        ),
        ("/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
        ("/completions", {"prompt": "hi", "priority": 2**63}, "priority"),
        ("/completions", {"prompt": "hi", "logit_bias": {"1": 1e300}}, "logit_bias"),
        ("/completions", {"prompt": "hi", "logit_bias": {str(2**70): 1}}, "logit_bias"),
        ("/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ("/completions", {"prompt": "hi", "min_tokens": 2**63}, "min_tokens"),
        ("/completions", {"prompt": "hi", "stop_token_ids": [2**63]}, "stop_token_ids"),
        ("/completions", {"prompt": "hi", "max_tokens": 2**63}, "max_tokens"),
    ],
)
def test_out_of_range_field_is_a_400_and_innocents_keep_their_text(
    server, alone, path, poison, param
) -> None:
    body = {"model": MODEL, "max_tokens": 8, "temperature": 1.0} | poison
    resp, texts = poison_beside_innocents(server, path, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"].startswith(param) and err["type"] == "invalid_request_error", err
    assert_same_text(texts, alone)


def test_top_k_beyond_the_vocabulary_is_off(server, model_dir) -> None:
    """top_k >= vocab keeps every token (vLLM's semantics): the same draw as top_k 0."""
    vocab = server.engine.limits.vocab_size
    base = {"model": MODEL, "prompt": "a b", "max_tokens": 12, "temperature": 1.0, "seed": 5}
    off = httpx.post(f"{server.base_url}/completions", json=base, timeout=60)
    big = httpx.post(
        f"{server.base_url}/completions", json=base | {"top_k": vocab + 1000}, timeout=60
    )
    assert off.status_code == big.status_code == 200, big.text
    assert big.json()["choices"][0]["text"] == off.json()["choices"][0]["text"]


@pytest.fixture
def faulty_sampler(monkeypatch) -> list[int]:
    """Make sampling raise for any batch holding the FAULT_SEED request; the batch sizes that
    raised are recorded (so a test can show the fault hit a shared batch)."""
    original = Sampler.__call__
    raised: list[int] = []

    def call(self, logits, rows):
        if any(r.params.seed == FAULT_SEED for r in rows):
            raised.append(len(rows))
            raise RuntimeError("injected sampling fault")
        return original(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", call)
    return raised


@pytest.fixture
def faulty_logits_processor(monkeypatch) -> list[int]:
    """The same fault, raised by the logits processor (logit_bias / grammar masks) instead."""
    original = LogitsProcessor.apply
    raised: list[int] = []

    def apply(self, logits, request_ids, params):
        if any(p.seed == FAULT_SEED for p in params):
            raised.append(len(params))
            raise RuntimeError("injected sampling fault")
        return original(self, logits, request_ids, params)

    monkeypatch.setattr(LogitsProcessor, "apply", apply)
    return raised


def test_injected_sampling_fault_fails_only_its_request(server, alone, faulty_sampler) -> None:
    # A seeded draw: a batch of greedy rows alone never reaches the sampler (their argmax is
    # taken directly, ModelRunner.execute), so the poison's row is what sends it there.
    poison = {
        "model": MODEL,
        "prompt": "hello",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": FAULT_SEED,
    }
    resp, texts = poison_beside_innocents(server, "/completions", poison)
    assert resp.status_code == 500, resp.text
    assert "injected sampling fault" in resp.json()["error"]["message"]
    assert max(faulty_sampler) > 1, f"the fault never hit a shared batch: {faulty_sampler}"
    assert_same_text(texts, alone)
    # The server keeps serving, and every KV block is free again.
    stats = server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_blocks"]


# ---- the engine itself (no HTTP) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32"))


def run(engine: LLMEngine, requests: dict[str, SamplingParams]) -> dict[str, Any]:
    """Run ``requests`` (id -> params, prompt = a fixed text per id) together to the end."""
    for i, (rid, params) in enumerate(requests.items()):
        engine.add_request(f"prompt {i} of the batch", params, request_id=rid)
    finals: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    return finals


@pytest.mark.parametrize("fault", ["faulty_sampler", "faulty_logits_processor"])
def test_engine_fails_only_the_faulty_row_and_seeded_rows_keep_their_draw(
    engine, fault, request
) -> None:
    innocents = {
        "greedy": SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True),
        "logprobs": SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True),
    }
    # Alone = without the faulty request (same ids and prompts, so the same prompt texts).
    want = run(engine, innocents)
    raised = request.getfixturevalue(fault)
    faulty = SamplingParams(max_tokens=20, temperature=0, seed=FAULT_SEED, ignore_eos=True)
    got = run(engine, innocents | {"faulty": faulty})
    assert got["faulty"].finish_reason == "error"
    assert "injected sampling fault" in got["faulty"].error
    assert raised and max(raised) == 4
    for rid in innocents:
        assert got[rid].finish_reason == "length", got[rid]
        assert got[rid].token_ids == want[rid].token_ids, rid
    # The same tokens and candidates; the values within float32 noise: a float32 GEMM over 4
    # rows need not sum in the order it does over 3 (on an AVX2 machine the logprobs moved
    # by ~2e-7), so bit equality is not promised across batch compositions.
    assert_same_logprobs(got["logprobs"].logprobs, want["logprobs"].logprobs)
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def assert_same_logprobs(got: list[Any], want: list[Any]) -> None:
    assert [g.token_id for g in got] == [w.token_id for w in want]
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g.top] == [t for t, _ in w.top], (g, w)
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5), (g, w)
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-5), (g, w)


def test_engine_survives_a_top_k_that_slipped_past_validation(engine) -> None:
    """Defence in depth: a top_k no validation stopped (set behind the dataclass' back)
    is clamped to the vocabulary by the sampler instead of overflowing."""
    poison = SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    object.__setattr__(poison, "top_k", 2**63)
    got = run(engine, {"poison": poison, "ok": SamplingParams(max_tokens=5, temperature=0)})
    assert got["poison"].finish_reason == "length" and got["ok"].finish_reason == "length"
    same_off = run(engine, {"poison": replace(poison, top_k=0)})
    assert same_off["poison"].token_ids == got["poison"].token_ids

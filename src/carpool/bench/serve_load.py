"""``carpool bench serve``: an asynchronous load generator for OpenAI-compatible servers.

Requests go to ``POST {url}/v1/completions`` with ``stream=true``, at Poisson arrival times
from a fixed seed (or all at once with an infinite rate), at most ``max_concurrency`` in flight.
Each response is read as server-sent events (``data: {...}`` lines ending with
``data: [DONE]``); the client times the first text chunk (TTFT), the gaps between text chunks
(inter-token latency) and the whole request (end-to-end latency). Output tokens come from the
``usage`` chunk when the server honours ``stream_options.include_usage``, otherwise one per text
chunk. Any failure (HTTP status, timeout, connection error, malformed stream) is counted by
kind; the benchmark never crashes on one. ``serve_summary`` turns the results into the report.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

# Common English words: prompts any tokenizer handles, about one token per word.
_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more can
out up about into than them time only new some could these two may first then do any like my now
over such our man me even most made after also did many before must years
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class PromptSpec:
    """One request: its prompt (text or token ids), how many tokens to ask for and,
    optionally, its ``priority`` (sent as the vLLM/carpool field; None: not sent)."""

    prompt: str | list[int]
    max_tokens: int
    priority: int | None = None


@dataclass
class RequestResult:
    """What the client saw of one request (times in seconds).

    Attributes:
        ok: the stream completed (``[DONE]`` or a finish reason) with no error.
        error: failure kind (``http_500``, ``timeout``, ``connection``, ``protocol``...).
        ttft: time to the first text chunk.
        itl: gaps between successive text chunks.
        latency: send to last byte.
        output_tokens: from ``usage`` when given, else text chunks.
        prompt_tokens: from ``usage`` (None when the server did not send it).
        cached_tokens: ``usage.prompt_tokens_details.cached_tokens`` (None when not sent).
        priority: the request's priority class (None when none was sent).
        text: the generated text (multi-turn mode feeds it to the next turn).
    """

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    priority: int | None = None
    text: str = ""
    end: float | None = None  # seconds from the start of the load to this request's end


def synthetic_prompts(
    n: int, prompt_len: int, output_len: int, seed: int, tail: float = 4.0
) -> list[PromptSpec]:
    """``n`` prompts with long-tailed (lognormal) lengths.

    Prompt words and ``max_tokens`` have medians ``prompt_len`` and ``output_len`` and put
    their 99th percentile at ``tail`` times the median (clamped to ``[1, tail x median]``).
    """
    rng = random.Random(seed)
    sigma = math.log(tail) / 2.326  # z of the 99th percentile

    def draw(median: int) -> int:
        return max(1, min(round(tail * median), round(rng.lognormvariate(math.log(median), sigma))))

    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(draw(prompt_len))]
        out.append(PromptSpec(" ".join(words), draw(output_len)))
    return out


def load_dataset(path: Path, n: int, output_len: int, seed: int) -> list[PromptSpec]:
    """``n`` prompts from a JSONL file, cycling through it.

    Each line is an object with ``prompt`` (or ``text``) and optionally ``max_tokens`` (or
    ``output_len``); a missing length is drawn like ``synthetic_prompts``' outputs.

    Raises:
        ValueError: the file has no usable line, or a line is not such an object.
    """
    rows: list[tuple[str, int | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj.get("prompt", obj.get("text"))
            length = obj.get("max_tokens", obj.get("output_len"))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}:{number}: needs a non-empty string 'prompt'")
        if length is not None and (not isinstance(length, int) or length < 1):
            raise ValueError(f"{path}:{number}: max_tokens must be an int >= 1")
        rows.append((text, length))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    drawn = synthetic_prompts(n, 1, output_len, seed)
    return [
        PromptSpec(rows[i % len(rows)][0], rows[i % len(rows)][1] or drawn[i].max_tokens)
        for i in range(n)
    ]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (s) of a Poisson process at ``rate`` requests/s; all 0 when infinite."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _chunk_text(chunk: dict[str, Any]) -> str:
    """Text of a completions (``text``) or chat (``delta.content``) chunk's first choice."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """POST one streaming completion and time it; never raises for a failed request."""
    res = RequestResult()
    start = time.perf_counter()
    last: float | None = None
    chunks = 0
    finished = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                res.error = f"http_{resp.status_code}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError("chunk is not a JSON object")
                if chunk.get("error"):
                    res.error = "stream_error"
                    return res
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens")
                if any(c.get("finish_reason") for c in chunk.get("choices") or []):
                    finished = True
                if text := _chunk_text(chunk):
                    res.text += text
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
    except httpx.TimeoutException:
        res.error = "timeout"
        return res
    except (httpx.TransportError, httpx.StreamError):
        res.error = "connection"
        return res
    except (ValueError, TypeError, AttributeError):  # bad JSON or an unexpected shape
        res.error = "protocol"
        return res
    res.latency = time.perf_counter() - start
    if not finished:
        res.error = "incomplete"
        return res
    if res.output_tokens == 0:
        res.output_tokens = chunks
    res.ok = True
    return res


@dataclass(frozen=True)
class LoadSpec:
    """How to send the load.

    Attributes:
        url: the server's base URL (``http://host:port``; ``/v1`` is added).
        model: the ``model`` field of each request.
        request_rate: Poisson arrivals per second (``inf``: all at once).
        max_concurrency: most requests in flight (None: no limit).
        seed: seed of the arrival times.
        timeout: seconds before one request counts as a timeout.
        include_usage: ask for a usage chunk (``stream_options.include_usage``).
        extra_body: more request fields (``temperature``, ``ignore_eos``...).
    """

    url: str
    model: str
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    timeout: float = 300.0
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


def _body(spec: LoadSpec, p: PromptSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "prompt": p.prompt,
        "max_tokens": p.max_tokens,
        "stream": True,
        **spec.extra_body,
    }
    if p.priority is not None:
        body["priority"] = p.priority
    if spec.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def send_prompt(
    client: httpx.AsyncClient, url: str, spec: LoadSpec, p: PromptSpec
) -> RequestResult:
    """``send_request`` of one ``PromptSpec`` to ``{url}/completions`` (url ends in /v1)."""
    result = await send_request(client, url + "/completions", _body(spec, p))
    result.priority = p.priority
    return result


T = TypeVar("T")
R = TypeVar("R")


async def run_at_arrivals(
    spec: LoadSpec,
    items: Sequence[T],
    job: Callable[[httpx.AsyncClient, str, T, float], Awaitable[R]],
) -> tuple[list[R], float]:
    """Start ``job(client, url, item, start)`` for each item at its Poisson arrival time.

    At most ``spec.max_concurrency`` jobs run at once; ``url`` ends in ``/v1`` and ``start`` is
    the ``perf_counter`` time the load began. Returns (results in item order, wall seconds).
    """
    url = spec.url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    limit = asyncio.Semaphore(spec.max_concurrency or len(items) or 1)
    offsets = arrival_times(len(items), spec.request_rate, spec.seed)
    limits = httpx.Limits(max_connections=spec.max_concurrency, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(spec.timeout), limits=limits, trust_env=False
    ) as client:
        start = time.perf_counter()

        async def one(item: T, offset: float) -> R:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with limit:
                return await job(client, url, item, start)

        results = await asyncio.gather(*(one(x, t) for x, t in zip(items, offsets, strict=True)))
        return list(results), time.perf_counter() - start


async def run_load(
    spec: LoadSpec,
    prompts: Sequence[PromptSpec],
    on_done: Callable[[RequestResult], None] = lambda _r: None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt at its arrival time; (results in prompt order, wall seconds)."""

    async def one(
        client: httpx.AsyncClient, url: str, p: PromptSpec, start: float
    ) -> RequestResult:
        result = await send_prompt(client, url, spec, p)
        result.end = time.perf_counter() - start
        on_done(result)
        return result

    return await run_at_arrivals(spec, prompts, one)

"""A corpus of malformed requests: each gets a 4xx naming the field, never a 5xx."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

MODEL = "tiny-llama"
C = "/completions"
CHAT = "/chat/completions"
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"Content-Type": "application/json"}


def body(d: dict) -> bytes:
    return json.dumps(d).encode()


# (name, path, raw body, headers, expected status, field that must be named)
CASES: list[tuple[str, str, bytes, dict, int, str | None]] = [
    ("truncated json", C, b'{"model": "tiny-llama", "prompt":', JSON, 400, "JSON"),
    ("not an object", C, b"[1, 2, 3]", JSON, 400, "object"),
    ("bare string", C, b'"hello"', JSON, 400, "object"),
    ("empty body", C, b"", JSON, 400, "JSON"),
    ("missing model", C, body({"prompt": "hi"}), JSON, 400, "model"),
    ("missing prompt", C, body({"model": MODEL}), JSON, 400, "prompt"),
    ("prompt wrong type", C, body(OK | {"prompt": 123}), JSON, 400, "prompt"),
    ("prompt empty list", C, body(OK | {"prompt": []}), JSON, 400, "prompt"),
    ("prompt empty ids", C, body(OK | {"prompt": [[]]}), JSON, 400, "prompt"),
    ("prompt id too big", C, body(OK | {"prompt": [5, 999999]}), JSON, 400, "prompt"),
    ("prompt id negative", C, body(OK | {"prompt": [-1]}), JSON, 400, "prompt"),
    ("prompt mixed list", C, body(OK | {"prompt": ["a", 1]}), JSON, 400, "prompt"),
    ("prompt too long", C, body(OK | {"prompt": "a b " * 3000}), JSON, 400, "prompt"),
    ("max_tokens negative", C, body(OK | {"max_tokens": -1}), JSON, 400, "max_tokens"),
    ("max_tokens string", C, body(OK | {"max_tokens": "10"}), JSON, 400, "max_tokens"),
    ("max_tokens float", C, body(OK | {"max_tokens": 1.5}), JSON, 400, "max_tokens"),
    ("max_tokens huge", C, body(OK | {"max_tokens": 10**12}), JSON, 400, "max_tokens"),
    ("max_tokens bool", C, body(OK | {"max_tokens": True}), JSON, 400, "max_tokens"),
    ("temperature negative", C, body(OK | {"temperature": -1}), JSON, 400, "temperature"),
    ("temperature string", C, body(OK | {"temperature": "hot"}), JSON, 400, "temperature"),
    (
        "temperature inf",
        C,
        b'{"model": "tiny-llama", "prompt": "x", "temperature": 1e999}',
        JSON,
        400,
        "temperature",
    ),
    (
        "temperature nan",
        C,
        b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
        JSON,
        400,
        None,
    ),
    ("top_p zero", C, body(OK | {"top_p": 0}), JSON, 400, "top_p"),
    ("top_p above one", C, body(OK | {"top_p": 1.5}), JSON, 400, "top_p"),
    ("n zero", C, body(OK | {"n": 0}), JSON, 400, "n"),
    ("n huge", C, body(OK | {"n": 100000}), JSON, 400, "n"),
    ("logprobs too many", C, body(OK | {"logprobs": 21}), JSON, 400, "logprobs"),
    ("presence_penalty", C, body(OK | {"presence_penalty": 5}), JSON, 400, "presence_penalty"),
    ("frequency_penalty", C, body(OK | {"frequency_penalty": -3}), JSON, 400, "frequency_penalty"),
    ("stop wrong type", C, body(OK | {"stop": 5}), JSON, 400, "stop"),
    ("stop empty string", C, body(OK | {"stop": [""]}), JSON, 400, "stop"),
    ("stop too many", C, body(OK | {"stop": [str(i) for i in range(17)]}), JSON, 400, "stop"),
    ("seed string", C, body(OK | {"seed": "x"}), JSON, 400, "seed"),
    ("seed huge", C, body(OK | {"seed": 2**70}), JSON, 400, "seed"),
    ("stream string", C, body(OK | {"stream": "yes"}), JSON, 400, "stream"),
    (
        "stream_options alone",
        C,
        body(OK | {"stream_options": {"include_usage": True}}),
        JSON,
        400,
        "stream_options",
    ),
    ("top_k negative", C, body(OK | {"top_k": -1}), JSON, 400, "top_k"),
    (
        "repetition_penalty 0",
        C,
        body(OK | {"repetition_penalty": 0}),
        JSON,
        400,
        "repetition_penalty",
    ),
    ("timeout negative", C, body(OK | {"timeout": -1}), JSON, 400, "timeout"),
    ("ignore_eos string", C, body(OK | {"ignore_eos": "true"}), JSON, 400, "ignore_eos"),
    ("user not a string", C, body(OK | {"user": 5}), JSON, 400, "user"),
    ("unknown model", C, body(OK | {"model": "gpt-4"}), JSON, 404, "model"),
    ("non-utf8 bytes", C, b'{"model": "tiny-llama", "prompt": "\xff\xfe\xfa"}', JSON, 400, "JSON"),
    (
        "deeply nested",
        C,
        b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        JSON,
        400,
        None,
    ),
    ("10 MB body", C, body(OK | {"prompt": "x" * 10_000_000}), JSON, 413, "limit"),
    ("text/plain", C, body(OK), {"Content-Type": "text/plain"}, 415, "Content-Type"),
    (
        "form encoded",
        C,
        b"model=tiny-llama&prompt=hi",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "Content-Type",
    ),
    ("no content type", C, body(OK), {}, 415, "Content-Type"),
    ("chat missing messages", CHAT, body({"model": MODEL}), JSON, 400, "messages"),
    ("chat empty messages", CHAT, body(CHAT_OK | {"messages": []}), JSON, 400, "messages"),
    ("chat messages string", CHAT, body(CHAT_OK | {"messages": "hi"}), JSON, 400, "messages"),
    (
        "chat bad role",
        CHAT,
        body(CHAT_OK | {"messages": [{"role": "wizard", "content": "x"}]}),
        JSON,
        400,
        "messages[0].role",
    ),
    (
        "chat missing role",
        CHAT,
        body(CHAT_OK | {"messages": [{"content": "x"}]}),
        JSON,
        400,
        "messages[0].role",
    ),
    (
        "chat content number",
        CHAT,
        body(CHAT_OK | {"messages": [{"role": "user", "content": 5}]}),
        JSON,
        400,
        "messages[0].content",
    ),
    (
        "chat image part",
        CHAT,
        body(
            CHAT_OK
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ]
            }
        ),
        JSON,
        400,
        "messages[0].content",
    ),
    (
        "chat message not object",
        CHAT,
        body(CHAT_OK | {"messages": [["user", "hi"]]}),
        JSON,
        400,
        "messages[0]",
    ),
    (
        "chat top_logprobs alone",
        CHAT,
        body(CHAT_OK | {"top_logprobs": 2}),
        JSON,
        400,
        "top_logprobs",
    ),
    (
        "chat max_completion_tokens 0",
        CHAT,
        body(CHAT_OK | {"max_completion_tokens": 0}),
        JSON,
        400,
        "max_completion_tokens",
    ),
    ("chat logprobs int", CHAT, body(CHAT_OK | {"logprobs": 3}), JSON, 400, "logprobs"),
    (
        "chat max_tokens over context",
        CHAT,
        body(CHAT_OK | {"max_tokens": 5000}),
        JSON,
        400,
        "max_tokens",
    ),
]


def _chunked_big():
    for _ in range(40):
        yield b"x" * 65536


@pytest.mark.slow
def test_malformed_corpus(server):
    assert len(CASES) >= 30
    failures = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for name, path, raw, headers, status, field in CASES:
            r = client.post(path, content=raw, headers=headers)
            problem = None
            if r.status_code != status:
                problem = f"status {r.status_code} != {status}: {r.text[:300]}"
            else:
                err = r.json().get("error", {})
                if set(err) != {"message", "type", "param", "code", "request_id"}:
                    problem = f"not an OpenAI error body: {r.text[:300]}"
                elif field is not None and field != err["param"] and field not in err["message"]:
                    problem = f"{field!r} not named: {err}"
            if problem:
                failures.append(f"{name}: {problem}")
        # A chunked body (no Content-Length) over the limit is counted as it streams.
        r = client.post(C, content=_chunked_big(), headers=JSON)
        if r.status_code != 413:
            failures.append(f"chunked 2.5 MB body: status {r.status_code}")
        r = client.get(C)
        if r.status_code != 405 or "error" not in r.json():
            failures.append(f"GET on a POST route: {r.status_code} {r.text[:200]}")
        # The server still answers correctly afterwards.
        r = client.post(C, json=OK)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        r = client.post(CHAT, json=CHAT_OK)
        assert r.status_code == 200, r.text
    assert not failures, "\n".join(failures)
    s = server.wait_idle()
    assert s["num_free_blocks"] == s["num_blocks"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_unknown_fields_are_ignored_and_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="carpool.server")
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        timeout=30,
        json=CHAT_OK
        | {
            "frobnicate": 1,
            "tools_v9": [],
            "messages": [{"role": "user", "content": "hi", "mood": "happy"}],
        },
    )
    assert r.status_code == 200, r.text
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "frobnicate" in text and "tools_v9" in text and "messages[0].mood" in text

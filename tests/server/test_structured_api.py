"""Structured outputs and the rest of the OpenAI surface, through the real server.

The embedded code model would never write JSON by itself: valid JSON here is the constraint's
doing. Every request goes through uvicorn and the official ``openai`` client (or raw HTTP for
vLLM's utility routes and the error bodies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from server.conftest import LiveServer
from structured.embedded import EMBEDDED
from structured.schemas import SCHEMAS


@pytest.fixture(scope="module")
def srv() -> Iterator[LiveServer]:
    s = LiveServer(EMBEDDED)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(srv) -> str:
    return srv.app.state.carpool.model_name


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_chat_json_schema_non_stream_and_stream(client, model):
    schema = SCHEMAS["mixed_record"]
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": "Describe a book."}]
    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=200, temperature=0, response_format=fmt
    )
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    chunks = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=200, temperature=0, response_format=fmt, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_completions_json_object_and_vllm_fields(client, model):
    r = client.completions.create(
        model=model,
        prompt="def f():",
        max_tokens=120,
        temperature=0,
        extra_body={"structured_outputs": {"json": SCHEMAS["refs"]}},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["refs"])
    for body, check in [
        ({"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{2}"}, r"[A-Z][a-z]{2,5} [0-9]{2}"),
        ({"guided_choice": ["left", "right"]}, r"left|right"),
        ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
        ({"guided_grammar": 'root ::= "<" [a-c]+ ">"'}, r"<[a-c]+>"),
        ({"guided_json": SCHEMAS["string_enum"]}, r'\{"color": "(red|green|blue)"\}'),
    ]:
        r = client.completions.create(
            model=model, prompt="x = ", max_tokens=30, temperature=0, extra_body=body
        )
        assert re.fullmatch(check, r.choices[0].text), (body, r.choices[0].text)


def test_invalid_or_double_constraints_are_400(srv, model):
    url = f"{srv.base_url}/chat/completions"
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}
    for extra, param in [
        ({"response_format": bad_schema}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ]:
        err = _error(httpx.post(url, json=base | extra, timeout=60))
        assert err["param"] == param, (extra, err)
    r = httpx.post(url, json=base | {"response_format": {"type": "text"}}, timeout=60)
    assert r.status_code == 200


def test_logit_bias(client, srv, model):
    r = client.completions.create(
        model=model, prompt="def f():", max_tokens=5, temperature=0, logit_bias={"77": 100}
    )
    ids = httpx.post(f"{srv.url}/tokenize", json={"prompt": r.choices[0].text}).json()["tokens"]
    assert set(ids) - {0} == {77}
    err = _error(
        httpx.post(
            f"{srv.base_url}/completions",
            json={"model": model, "prompt": "x", "logit_bias": {"4096": 1}},
        )
    )
    assert err["param"] == "logit_bias"


def test_echo_best_of_and_unsupported_fields(client, srv, model):
    plain = client.completions.create(model=model, prompt="def f(", max_tokens=6, temperature=0)
    echoed = client.completions.create(
        model=model, prompt="def f(", max_tokens=6, temperature=0, echo=True, best_of=1
    )
    assert echoed.choices[0].text == "def f(" + plain.choices[0].text
    chunks = client.completions.create(
        model=model, prompt="def f(", max_tokens=6, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    url = f"{srv.base_url}/completions"
    for body, param in [
        ({"suffix": "\n"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ]:
        err = _error(httpx.post(url, json={"model": model, "prompt": "x"} | body))
        assert (err["param"], err["code"]) == (param, "unsupported_parameter")
    err = _error(
        httpx.post(
            f"{srv.base_url}/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "x"}], "audio": {}},
        )
    )
    assert (err["param"], err["code"]) == ("audio", "unsupported_parameter")
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        user="u1",
        metadata={"k": "v"},
        store=False,
    )
    assert r.choices[0].message.content


def test_tokenize_detokenize_version(srv, model):
    tok = httpx.post(
        f"{srv.url}/tokenize",
        json={"model": model, "prompt": "def f(x):", "return_token_strs": True},
    ).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 1024
    assert tok["token_strs"][0] == "<|bos|>" and tok["tokens"][0] == 0
    no_special = httpx.post(
        f"{srv.url}/tokenize", json={"prompt": "def f(x):", "add_special_tokens": False}
    ).json()
    assert no_special["tokens"] == tok["tokens"][1:]
    back = httpx.post(f"{srv.url}/detokenize", json={"tokens": no_special["tokens"]}).json()
    assert back == {"prompt": "def f(x):"}
    chat = httpx.post(
        f"{srv.url}/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}
    ).json()
    text = httpx.post(f"{srv.url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "user\nhello" in text and text.endswith("assistant\n")
    assert httpx.post(f"{srv.url}/detokenize", json={"tokens": [99999]}).status_code == 400
    assert httpx.post(f"{srv.url}/tokenize", json={}).status_code == 400
    v = httpx.get(f"{srv.url}/version").json()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", v["version"])


def test_logprobs_of_masked_tokens_are_finite(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "pick"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")
    tops = [t.logprob for lp in r.choices[0].logprobs.content for t in lp.top_logprobs]
    assert min(tops) == -9999.0  # fewer than 5 tokens are allowed at some step

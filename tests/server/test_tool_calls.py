"""Tool calling through the real server and the official ``openai`` client.

The embedded code model, served with real tool-capable chat templates (Qwen2.5's Hermes-style
``<tool_call>`` and Llama 3.1's JSON): forced choices (``required``, named) are enforced by a
JSON constraint, so they always parse; ``auto`` is exercised by constraining the model, with a
regex, to write its template's own call format, which the template's parser must then read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from carpool.server import ServerConfig
from server.conftest import LiveServer
from structured.embedded import EMBEDDED

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat-templates"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def _model_dir(tmp: Path, template: str) -> Path:
    """The embedded model's files with a tool-capable chat template beside them."""
    d = tmp / template.removesuffix(".jinja")
    d.mkdir()
    for f in EMBEDDED.iterdir():
        (d / f.name).symlink_to(f)
    shutil.copy(TEMPLATES / template, d / "chat_template.jinja")
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Iterator[LiveServer]:
    s = LiveServer(_model_dir(tmp_path_factory.mktemp("tools"), "Qwen-Qwen2.5-7B-Instruct.jinja"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Iterator[LiveServer]:
    d = _model_dir(tmp_path_factory.mktemp("tools"), "meta-llama-Llama-3.1-8B-Instruct.jinja")
    s = LiveServer(d)
    yield s
    s.stop()


def _client(s: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)


def _name(s: LiveServer) -> str:
    return s.app.state.carpool.model_name


def _check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def _collect_stream(chunks) -> tuple[str, dict[int, dict], str | None]:
    content, calls, finish = "", {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or tc.id
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, calls, finish


def test_parser_follows_template_or_flag(qwen, llama, make_server):
    assert qwen.app.state.carpool.serving.chat.tool_parser.name == "hermes"
    assert llama.app.state.carpool.serving.chat.tool_parser.name == "llama3_json"
    with pytest.raises(ValueError):
        ServerConfig(tool_call_parser="nope")


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice(qwen, stream):
    c = _client(qwen)
    kw = dict(
        model=_name(qwen),
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=0,
    )
    if not stream:
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        assert [t.function.name for t in ch.message.tool_calls] == ["get_time"]
        _check_call(ch.message.tool_calls[0])
        return
    content, calls, finish = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert content == "" and finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice(qwen, stream):
    c = _client(qwen)
    kw = dict(
        model=_name(qwen),
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    if not stream:
        ch = c.chat.completions.create(**kw).choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        _check_call(ch.message.tool_calls[0])
        return
    _, calls, finish = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", '
    r'"unit": "celsius"\}\}\n</tool_call>'
)
LLAMA_CALL = (
    r'\{"name": "get_weather", "parameters": \{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}'
)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_auto_parses_the_templates_own_format(request, which, stream):
    s = request.getfixturevalue(which)
    regex = HERMES_CALL if which == "qwen" else LLAMA_CALL
    kw = dict(
        model=_name(s),
        messages=ASK,
        tools=TOOLS,
        max_tokens=150,
        temperature=0,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    c = _client(s)
    if not stream:
        ch = c.chat.completions.create(**kw).choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.function.name == "get_weather"
        assert _check_call(call)["unit"] == "celsius"
        return
    content, calls, finish = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert content == "" and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_auto_without_a_call_is_plain_content(qwen):
    c = _client(qwen)
    kw = dict(model=_name(qwen), messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    ch = c.chat.completions.create(**kw).choices[0]
    assert ch.message.tool_calls is None and ch.finish_reason == "length"
    content, calls, _ = _collect_stream(c.chat.completions.create(**kw, stream=True))
    assert calls == {} and content == ch.message.content


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_multi_turn_call_result_answer(request, which):
    s = request.getfixturevalue(which)
    c = _client(s)
    first = c.chat.completions.create(
        model=_name(s),
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = c.chat.completions.create(
        model=_name(s), messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    # The template rendered the call and its result into the prompt the model saw.
    tok = httpx.post(f"{s.url}/tokenize", json={"messages": history, "tools": TOOLS}).json()
    text = httpx.post(f"{s.url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    # (Llama 3.1's template writes a tool result through ``tojson``, quotes escaped.)
    assert '{"temp_c": 21}' in text or '"{\\"temp_c\\": 21}"' in text
    assert "get_weather" in text and json.loads(call.function.arguments)["city"] in text
    if which == "qwen":
        assert "<tool_call>" in text and "<tool_response>" in text
    else:
        assert "ipython" in text and '"parameters"' in text


def test_tool_errors(qwen):
    url = f"{qwen.base_url}/chat/completions"
    base = {"model": _name(qwen), "messages": ASK, "max_tokens": 4}
    r = httpx.post(url, json=base | {"tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    named = {"type": "function", "function": {"name": "nope"}}
    r = httpx.post(url, json=base | {"tools": TOOLS, "tool_choice": named})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(
        url,
        json=base
        | {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"

"""Tool-call parsers, parser choice from templates, and the streamed tool-call splitter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carpool.server.tool_stream import ToolCallStreamer, ToolPlan, tool_message
from carpool.tools.choice import forced_call_constraint, parse_forced_calls
from carpool.tools.parsers import HermesParser, Llama3JsonParser, choose_parser

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat-templates"
TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "b"}},
]


def test_hermes_parses_calls_and_keeps_leading_content():
    text = (
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    )
    res = HermesParser().parse(text)
    assert res.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in res.calls] == [("a", {"x": 1}), ("b", {})]
    assert len({c.id for c in res.calls}) == 2


def test_hermes_leaves_broken_or_absent_calls_as_content():
    for text in [
        "no call here",
        '<tool_call>\n{"name": "a", "argu\n</tool_call>',
        "<tool_call>[1]",
    ]:
        res = HermesParser().parse(text)
        assert res.calls == [] and res.content == text


def test_llama3_json_parses_python_tag_and_semicolons():
    text = '<|python_tag|>{"name": "a", "parameters": {"q": "x"}}; {"name": "b", "parameters": {}}'
    res = Llama3JsonParser().parse(text)
    assert res.content is None
    assert [(c.name, json.loads(c.arguments)) for c in res.calls] == [("a", {"q": "x"}), ("b", {})]
    assert Llama3JsonParser().parse("The answer is 4.").calls == []
    assert Llama3JsonParser().parse('{"not": "a call"}').calls == []


def test_content_prefix_holds_back_a_possible_marker():
    p = HermesParser()
    assert p.content_prefix("Hello <tool") == "Hello "
    assert p.content_prefix("Hello <tool_call>{") == "Hello "
    assert p.content_prefix("a < b") == "a < b"
    llama = Llama3JsonParser()
    assert llama.content_prefix('  {"name"') == ""
    assert llama.content_prefix("Sure, 4.") == "Sure, 4."


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
        ("Qwen-Qwen3-0.6B.jinja", "hermes"),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3_json"),
    ],
)
def test_parser_chosen_from_template(template, expected):
    source = (TEMPLATES / template).read_text()
    assert choose_parser(source).name == expected
    assert choose_parser(source, "hermes").name == "hermes"  # the flag wins
    with pytest.raises(ValueError):
        choose_parser(source, "unknown")


def test_forced_constraints_and_their_parsing():
    named = {"type": "function", "function": {"name": "a"}}
    c = forced_call_constraint(TOOLS, named, parallel=True)
    assert c is not None and json.loads(c.json) == {"type": "object"}
    req = forced_call_constraint(TOOLS, "required", parallel=False)
    schema = json.loads(req.json)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [["a"], ["b"]]
    assert forced_call_constraint(TOOLS, "auto", parallel=True) is None
    calls = parse_forced_calls('[{"name": "b", "parameters": {"k": 2}}]', "required")
    assert [(x.name, json.loads(x.arguments)) for x in calls] == [("b", {"k": 2})]
    assert parse_forced_calls('{"z": 1', named) == []  # cut short: no call


def test_streamer_auto_streams_content_then_whole_calls():
    plan = ToolPlan(TOOLS, "auto", None, HermesParser())
    st = ToolCallStreamer(plan)
    pieces = ["Hi", " there <to", 'ol_call>{"name": "a", ', '"arguments": {}}</tool_call>']
    out = [st.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert "".join(c for c, _ in out) == "Hi there "
    assert all(not calls for _, calls in out[:-1])
    (delta,) = out[-1][1]
    assert (delta.index, delta.function.name, delta.function.arguments) == (0, "a", "{}")
    assert st.called
    content, calls = tool_message(plan, "".join(pieces))
    assert content == "Hi there" and calls[0].function.name == "a"


def test_streamer_releases_held_text_when_no_call_parses():
    st = ToolCallStreamer(ToolPlan(TOOLS, "auto", None, HermesParser()))
    assert st.feed("x <tool", False) == ("x ", [])
    assert st.feed("bar", True) == ("<toolbar", [])
    assert not st.called

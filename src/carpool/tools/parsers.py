"""Tool-call parsers: model text -> content + calls, whole or while streaming.

Hermes/Qwen (Qwen2.5, Qwen3, Hermes templates) wrap each call in tags::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Llama 3.1/3.2/3.3 (JSON, "custom tool calling" of the template) answer with the bare object,
``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``, several separated
by ``;``.

Streaming: text before the first call marker streams as content; from the marker on, the
parser holds the text and emits each call (id, name, complete arguments) once it closes.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParsedCall:
    """One function call: its id, name and arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ParseResult:
    """What a model's text says: free text (None when only calls) and calls."""

    content: str | None
    calls: list[ParsedCall]


def _call(obj: object, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        return ParsedCall(obj["name"], args)
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """One wire format. ``parse`` reads a whole output; ``marker`` starts a call."""

    name: str
    marker: str

    @abstractmethod
    def parse(self, text: str) -> ParseResult:
        """Split ``text`` into content and calls (text that does not parse stays content)."""

    def content_prefix(self, text: str) -> str:
        """The part of a partial output that is surely content (before any call marker,
        holding back a tail that may be the start of one)."""
        i = text.find(self.marker)
        if i >= 0:
            return text[:i]
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-k:]):
                return text[:-k]
        return text


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParseResult:
        if self.marker not in text:
            return ParseResult(text, [])
        calls: list[ParsedCall] = []
        for m in self._CALL.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return ParseResult(text, [])
            calls.append(call)
        content = text[: text.find(self.marker)].strip()
        return ParseResult(content or None, calls)


class Llama3JsonParser(ToolParser):
    """``{"name": ..., "parameters": {...}}`` (Llama 3.x JSON tool calling), ``;``-separated."""

    name = "llama3_json"
    marker = "{"
    _PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> ParseResult:
        body = text.strip()
        if body.startswith(self._PYTHON_TAG):
            body = body[len(self._PYTHON_TAG) :].strip()
        if not body.startswith("{"):
            return ParseResult(text, [])
        decoder = json.JSONDecoder()
        calls: list[ParsedCall] = []
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParseResult(text, [])
            call = _call(obj, "parameters")
            if call is None:
                return ParseResult(text, [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\n;":
                pos += 1
        return ParseResult(None, calls)

    def content_prefix(self, text: str) -> str:
        # A Llama call is the whole message: content only when it does not start like one.
        stripped = text.lstrip()
        if (
            not stripped
            or "{".startswith(stripped[:1])
            or self._PYTHON_TAG.startswith(stripped[: len(self._PYTHON_TAG)])
        ):
            return ""
        return text


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def choose_parser(chat_template: str | None, name: str | None = None) -> ToolParser:
    """The parser named by ``--tool-call-parser``, else the one the chat template teaches.

    Raises:
        ValueError: an unknown parser name.
    """
    if name is not None:
        if name not in PARSERS:
            raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(PARSERS)}")
        return PARSERS[name]()
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesParser()
    if "<|python_tag|>" in template or '"parameters"' in template:
        return Llama3JsonParser()
    return HermesParser()

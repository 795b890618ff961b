"""Tool calls on the way out: a whole message, or OpenAI's streamed ``tool_calls`` deltas.

A ``ToolPlan`` says what a chat request's tools mean. ``tool_message`` turns a finished output
into (content, calls); ``ToolCallStreamer`` turns the stream of text deltas into content deltas
and ``DeltaToolCall``s: content streams until a call marker (auto), a named call streams its
arguments as they come, and other calls are sent whole when they close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carpool.server.protocol_ext import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from carpool.structured.params import StructuredOutputsParams
from carpool.tools.choice import parse_forced_calls
from carpool.tools.parsers import ParsedCall, ToolParser


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools: the rendered list (None: none), the choice, its constraint."""

    tools: list[dict[str, Any]] | None
    choice: str | dict[str, Any]
    constraint: StructuredOutputsParams | None
    parser: ToolParser

    @property
    def active(self) -> bool:
        return self.tools is not None


def _calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ParsedCall]]:
    if not plan.active:
        return text, []
    if plan.constraint is not None:
        calls = parse_forced_calls(text, plan.choice)
        return (None, calls) if calls else (text, [])
    res = plan.parser.parse(text)
    return res.content, res.calls


def _tool_call(c: ParsedCall) -> ToolCall:
    return ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))


def tool_message(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished output as the assistant message's ``content`` and ``tool_calls``."""
    content, calls = _calls(plan, text)
    return content, [_tool_call(c) for c in calls]


class ToolCallStreamer:
    """Splits one choice's text deltas into content deltas and tool-call deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of ``text`` already sent as content
        self.called = False
        self._named_id: str | None = None

    def feed(self, delta: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """The content to send and the tool-call deltas for one more text delta."""
        plan = self.plan
        if not plan.active:
            return delta, []
        self.text += delta
        if isinstance(plan.choice, dict):  # named: stream the arguments as they come
            if self._named_id is not None:
                fn = DeltaFunctionCall(arguments=delta)
                return "", [DeltaToolCall(index=0, function=fn)] if delta else []
            name = plan.choice["function"]["name"]
            self._named_id = ParsedCall(name, "").id
            self.called = True
            fn = DeltaFunctionCall(name=name, arguments=delta)
            return "", [DeltaToolCall(index=0, id=self._named_id, type="function", function=fn)]
        if plan.constraint is None:  # auto: content until a marker
            safe = plan.parser.content_prefix(self.text)
            content = safe[self.sent :] if len(safe) > self.sent else ""
            self.sent = max(self.sent, len(safe))
        else:
            content = ""
        if not finished:
            return content, []
        rest_content, calls = _calls(plan, self.text)
        if not calls:  # nothing parsed: what was held back is content after all
            return content + self.text[self.sent :], []
        self.called = True
        deltas = [
            DeltaToolCall(
                index=i,
                id=c.id,
                type="function",
                function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
            )
            for i, c in enumerate(calls)
        ]
        return content, deltas

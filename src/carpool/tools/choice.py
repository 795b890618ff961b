"""``tool_choice`` ``required`` and named: a JSON constraint that makes the call parse.

As vLLM does, a forced call is not written in the model's own wire format but as plain JSON the
constraint fixes: for a named function, the arguments object (validated by its ``parameters``
schema); for ``required``, an array of ``{"name", "parameters"}`` with at least one item (at
most one when ``parallel_tool_calls`` is false).
"""

from __future__ import annotations

import json
from typing import Any

from carpool.structured.params import StructuredOutputsParams
from carpool.tools.parsers import ParsedCall

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _params_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or _ANY_OBJECT


def forced_call_constraint(
    tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool
) -> StructuredOutputsParams | None:
    """The constraint of ``tool_choice`` (None for ``auto`` / ``none``).

    Args:
        tools: the request's tools as dicts (``{"type": "function", "function": {...}}``).
        choice: ``"required"``, ``"auto"``, ``"none"`` or ``{"type": "function",
            "function": {"name": ...}}``.
        parallel: ``parallel_tool_calls`` (several calls allowed under ``required``).
    """
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredOutputsParams.from_schema(_params_schema(tool), "tool_choice")
    if choice != "required":
        return None
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _params_schema(t),
            },
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
    }
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams.from_schema(schema, "tool_choice")


def parse_forced_calls(text: str, choice: str | dict[str, Any]) -> list[ParsedCall]:
    """The calls of a constrained output (empty when it was cut short and does not parse)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    if isinstance(choice, dict):
        return [ParsedCall(choice["function"]["name"], json.dumps(data, ensure_ascii=False))]
    return [
        ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
        for item in data
    ]

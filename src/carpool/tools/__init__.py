"""Tool calling: parse a model's tool-call text into OpenAI ``tool_calls``.

``parsers`` holds one parser per wire format a chat template teaches its model (Hermes/Qwen's
``<tool_call>`` tags, Llama 3.x's bare JSON) and picks one from the template or a flag;
``choice`` turns ``tool_choice`` ``required`` / a named function into a structured-output
constraint, so a forced call always parses.
"""

from carpool.tools.choice import forced_call_constraint, parse_forced_calls
from carpool.tools.parsers import (
    PARSERS,
    ParsedCall,
    ParseResult,
    ToolParser,
    choose_parser,
)

__all__ = [
    "PARSERS",
    "ParseResult",
    "ParsedCall",
    "ToolParser",
    "choose_parser",
    "forced_call_constraint",
    "parse_forced_calls",
]

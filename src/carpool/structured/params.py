"""The request side of a structured-output constraint (vLLM's ``StructuredOutputsParams``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from carpool.errors import InvalidRequestError

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on the generated text.

    Attributes:
        json: a JSON schema, stored as JSON text (so the object is hashable and a schema sent
            again is a compiler cache hit).
        json_object: any JSON object (OpenAI's ``{"type": "json_object"}``).
        regex: a regular expression the whole output must match.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (GBNF syntax, rule ``root``).
        param: the request field the constraint came from, named in errors
            (``"response_format"``, ``"structured_outputs"``, ``"guided_json"``...).
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequestError(
                f"exactly one structured output constraint is allowed, got {set_kinds or 'none'}",
                param=self.param,
            )
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise InvalidRequestError(
                    "choice must be a non-empty list of non-empty strings", param=self.param
                )
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{name} must be a non-empty string", param=self.param)

    @property
    def kind(self) -> str:
        """Which constraint this is: one of json, json_object, regex, choice, grammar."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_schema(cls, schema: Any, param: str) -> StructuredOutputsParams:
        """A JSON-schema constraint from a dict (or its JSON text).

        Raises:
            InvalidRequestError: the schema is not a JSON object or not a valid JSON schema.
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"schema is not valid JSON: {exc}", param=param) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("schema must be a JSON object", param=param)
        import jsonschema  # only the constraint path pays for the import

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise InvalidRequestError(f"invalid JSON schema: {exc.message}", param=param) from None
        # Key order kept: properties are generated in the order the schema lists them.
        return cls(json=json.dumps(schema), param=param)

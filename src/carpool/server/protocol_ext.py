"""Request bodies beyond plain sampling: constraints, tools, tokenize/detokenize.

``constraint_of`` turns whichever of OpenAI's ``response_format``, vLLM's ``structured_outputs``
or vLLM's older ``guided_*`` fields a request uses into one ``StructuredOutputsParams``; two
constraints in one request, or a malformed one, are a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from carpool.errors import InvalidRequestError
from carpool.structured.params import StructuredOutputsParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    # ``schema`` shadows a BaseModel attribute: keep the wire name through an alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Body):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class ConstraintFields(BaseModel):
    """The constraint fields both endpoints accept (mixed into the request models)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint_of(self) -> StructuredOutputsParams | None:
        """The request's one structured-output constraint, or None.

        Raises:
            InvalidRequestError: two constraints, an empty one, or a schema that is not a
                valid JSON schema (``param`` names the field).
        """
        found: list[StructuredOutputsParams] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(StructuredOutputsParams(json_object=True, param="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequestError(
                    "response_format: json_schema.schema is required for type json_schema",
                    param="response_format",
                )
            found.append(
                StructuredOutputsParams.from_schema(rf.json_schema.schema_, "response_format")
            )
        so = self.structured_outputs
        if so is not None:
            found.append(
                _from_fields(
                    "structured_outputs", so.json_, so.json_object, so.regex, so.choice, so.grammar
                )
            )
        for name, kw in (
            ("guided_json", {"json_": self.guided_json}),
            ("guided_regex", {"regex": self.guided_regex}),
            ("guided_choice", {"choice": self.guided_choice}),
            ("guided_grammar", {"grammar": self.guided_grammar}),
        ):
            if next(iter(kw.values())) is not None:
                found.append(_from_fields(name, **kw))
        if len(found) > 1:
            names = ", ".join(p.param for p in found)
            raise InvalidRequestError(
                f"at most one structured output constraint per request, got {names}",
                param=found[1].param,
            )
        return found[0] if found else None


def _from_fields(
    param: str,
    json_: dict[str, Any] | str | None = None,
    json_object: bool | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
) -> StructuredOutputsParams:
    if json_ is not None:
        if json_object or regex is not None or choice is not None or grammar is not None:
            raise InvalidRequestError("give exactly one constraint", param=param)
        return StructuredOutputsParams.from_schema(json_, param)
    return StructuredOutputsParams(
        json_object=bool(json_object),
        regex=regex,
        choice=tuple(choice) if choice is not None else None,
        grammar=grammar,
        param=param,
    )


# ---- tools ------------------------------------------------------------------------------------


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


# ---- tokenize / detokenize (vLLM's shapes) ----------------------------------------------------


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a ``prompt`` or chat ``messages`` (rendered with the template)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ToolDefinition] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str

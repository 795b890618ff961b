"""OpenAI request and response bodies as pydantic models.

Requests are validated strictly (``"5"`` is not an int, ``true`` is not a number) and every
range is checked here, so a bad field is reported with its name. Unknown fields are *allowed*
(OpenAI adds fields often): they are ignored and named in a log warning (``unknown_fields``),
a count plus the first few (``describe_unknown_fields``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carpool.errors import InvalidRequestError
from carpool.sampling_params import MAX_LOGPROBS, MAX_TOP_K, RequestOutputKind, SamplingParams
from carpool.server.protocol_ext import (
    ConstraintFields,
    DeltaToolCall,
    ToolCall,
    ToolChoice,
    ToolDefinition,
)

# torch generators take 64-bit seeds; n > 1 uses seed + i, so keep room at the top.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - 1024
MAX_N = 128
# Every int field has an upper bound: a JSON integer has no size, and a value past 64 bits
# that reached a tensor once failed a whole engine step (issue 15). The engine checks again.
_INT_MAX = 2**63 - 1
_TokenId = Annotated[int, Field(ge=0, le=_INT_MAX)]
MAX_STOP_TOKEN_IDS = 1024


# How much of a request's unknown field names one log line shows: a client can send 20,000
# keys (or one 1 MB key), and the log must not grow with them.
UNKNOWN_FIELDS_SHOWN = 5
UNKNOWN_FIELD_CHARS = 40


def describe_unknown_fields(names: list[str]) -> str:
    """``names`` for a log line: their count and the first few, each cut to a bounded length.

    ``["a", "b"]`` -> ``"2 unknown fields: a, b"``; 20,000 names -> ``"20000 unknown fields
    (first 5: ...)"``.
    """

    def cut(name: str) -> str:
        if len(name) <= UNKNOWN_FIELD_CHARS:
            return repr(name)[1:-1]
        return repr(name[:UNKNOWN_FIELD_CHARS])[1:-1] + f"...({len(name)} chars)"

    shown = ", ".join(cut(n) for n in names[:UNKNOWN_FIELDS_SHOWN])
    noun = "field" if len(names) == 1 else "fields"
    if len(names) <= UNKNOWN_FIELDS_SHOWN:
        return f"{len(names)} unknown {noun}: {shown}"
    return f"{len(names)} unknown {noun} (first {UNKNOWN_FIELDS_SHOWN}: {shown}, ...)"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    # Known OpenAI fields that would change the result and that carpool does not implement:
    # refused with 400 ``unsupported_parameter`` instead of being silently ignored.
    _UNSUPPORTED: ClassVar[frozenset[str]] = frozenset()

    def unknown_fields(self) -> list[str]:
        """Names of fields the server does not know (ignored), including nested ones."""
        return sorted(set(self.model_extra or {}) - self._UNSUPPORTED)

    def check_supported(self) -> None:
        """Raise for a set, result-changing field carpool does not implement.

        Raises:
            InvalidRequestError: code ``unsupported_parameter``, ``param`` the field.
        """
        for name in sorted(self._UNSUPPORTED & set(self.model_extra or {})):
            if (self.model_extra or {})[name] is not None:
                raise InvalidRequestError(
                    f"{name} is not supported by this server",
                    param=name,
                    code="unsupported_parameter",
                )


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request, ConstraintFields):
    """Fields shared by both endpoints (OpenAI's and carpool's extensions)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # Accepted and ignored: they change nothing in the result.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # carpool / vLLM extensions
    # top_k >= the vocabulary size keeps every token (off), as in vLLM
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=_INT_MAX)
    stop_token_ids: list[_TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    timeout: float | None = Field(None, gt=0, le=86_400)
    # lower is served first under --scheduling-policy priority (vLLM's field)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)

    def to_sampling_params(
        self, max_tokens: int, logprobs: int | None, output_kind: RequestOutputKind
    ) -> SamplingParams:
        """The engine's parameters for this request (``max_tokens`` already resolved).

        Raises:
            InvalidRequestError: a value the engine refuses (it names its ``param``).
        """
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            n=self.n,
            min_tokens=min(self.min_tokens, max_tokens),
            output_kind=output_kind,
            priority=self.priority,
            structured_outputs=self.constraint_of(),
            logit_bias=self.logit_bias or (),
        )

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16:
            raise ValueError("stop: at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must be non-empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    _UNSUPPORTED: ClassVar[frozenset[str]] = frozenset({"suffix"})

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=_INT_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                f"best_of ({self.best_of}) must equal n ({self.n}): ranking several samples"
                " is not supported",
                param="best_of",
                code="unsupported_parameter",
            )
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs (prompt logprobs) is not supported",
                param="echo",
                code="unsupported_parameter",
            )


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool calls' arguments parsed to objects)."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            msg["tool_calls"] = [tool_call_for_template(c) for c in self.tool_calls]
        return msg

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


def tool_call_for_template(call: ToolCall) -> dict[str, Any]:
    """A tool call with its JSON ``arguments`` parsed, as the templates expect a mapping."""
    import json

    try:
        args: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        args = call.function.arguments
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": args},
    }


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    _UNSUPPORTED: ClassVar[frozenset[str]] = frozenset(
        {"audio", "modalities", "prediction", "web_search_options", "functions", "function_call"}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=_INT_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=_INT_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: requires tools")
        if choice is not None and not isinstance(choice, str):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise ValueError(f"tool_choice: no tool named {choice.function.name!r}")
        return self

    def unknown_fields(self) -> list[str]:
        names = set(super().unknown_fields())
        for i, m in enumerate(self.messages):
            names.update(f"messages[{i}].{k}" for k in m.model_extra or {})
        return sorted(names)


# ---- responses --------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens read from the prefix cache


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "carpool"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data."""
    return model.model_dump(mode="json")

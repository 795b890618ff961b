"""What the engine hands back: per request, the completions so far and what each step added."""

from __future__ import annotations

from dataclasses import dataclass, field

from carpool.request import RequestTimings
from carpool.worker.sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    Attributes:
        index: which of the ``n`` completions (0-based).
        text: all text generated so far (stop string excluded).
        token_ids: all generated token ids.
        finish_reason: ``"stop"``, ``"length"``, ``"abort"``, ``"error"`` or None while running.
        stop_reason: the stop string or token id that ended it, if any.
        logprobs: per generated token, when the request asked for logprobs.
        delta_text: text added since the previous output of this request (for streaming).
        delta_token_ids: token ids added since the previous output.
        error: why the request failed (finish_reason ``"error"``).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request (all its completions) after an engine step.

    Attributes:
        request_id: the id given to (or made by) ``add_request``.
        prompt: the prompt text, when the prompt was given as text.
        prompt_token_ids: the prompt's token ids.
        outputs: one ``CompletionOutput`` per completion (``n`` of them).
        finished: True once every completion has finished.
        timings: latency figures of each completion's underlying request.
        num_cached_tokens: prompt tokens read from the prefix cache instead of computed (the
            prompt counted once: the least over the ``n`` completions, whose later siblings
            share the first one's blocks); OpenAI's ``usage.prompt_tokens_details.cached_tokens``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    timings: list[RequestTimings] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

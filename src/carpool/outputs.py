"""What the engine hands back: per request, its completions' text, tokens and logprobs.

How much each output carries depends on the request's ``SamplingParams.output_kind``
(``RequestOutputKind``): everything so far (CUMULATIVE), only what the step added (DELTA), or
everything once, at the end (FINAL_ONLY). ``delta_*`` always hold what is new since the
request's previous output, whatever the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carpool.request import RequestTimings
from carpool.sampling_params import RequestOutputKind

__all__ = ["CompletionOutput", "RequestOutput", "RequestOutputKind", "TokenLogprobs"]


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the chosen token and the top-N alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    Attributes:
        index: which of the ``n`` completions (0-based).
        text: the text generated so far (CUMULATIVE, FINAL_ONLY) or this step's (DELTA); stop
            string excluded.
        token_ids: generated token ids, so far or this step's (as ``text``).
        finish_reason: ``"stop"``, ``"length"``, ``"abort"``, ``"error"`` or None while running.
        stop_reason: the stop string or token id that ended it, if any.
        logprobs: per token of ``token_ids``, when the request asked for logprobs.
        delta_text: text added since the previous output of this request (for streaming).
        delta_token_ids: token ids added since the previous output.
        error: why the request failed (finish_reason ``"error"``).
        num_tokens: tokens generated so far in all (whatever ``token_ids`` holds).
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
    num_tokens: int = 0

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
        return sum(o.num_tokens or len(o.token_ids) for o in self.outputs)

"""Per-request sampling parameters, validated once when built.

``SamplingParams`` is immutable: the scheduler, the sampler and the detokenizer all read the same
object, so nothing downstream needs to re-check a value.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from carpool.errors import InvalidRequestError
from carpool.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20
# Bounds the engine can honour. Every value here reaches a tensor or a torch RNG, where a Python
# int past 64 bits raises inside the step (``top_k=2**63`` once failed whole batches).
MAX_TOP_K = 2**31 - 1  # more than any vocabulary; a top_k >= the vocabulary means "off" (vLLM)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what ``torch.Generator.manual_seed`` accepts
PRIORITY_MIN, PRIORITY_MAX = -(2**63), 2**63 - 1
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-300
# gives infinities and NaN probabilities, not a sharper distribution.
MIN_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What each ``RequestOutput`` of a request carries (vLLM's ``RequestOutputKind``).

    CUMULATIVE: everything generated so far, every step (the offline API's default; copies
        grow with the output, fine for short batch jobs).
    DELTA: only what this step added (streams: each step costs O(new tokens), not O(all)).
    FINAL_ONLY: one output, when the request finished, with everything (non-streaming HTTP).
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    # bool is an int subclass: ``max_tokens=True`` is a bug at the caller, not "1".
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an int, got {value!r}", param=name)
    if low is not None and value < low:
        raise InvalidRequestError(f"{name} must be >= {low}, got {value}", param=name)
    if high is not None and value > high:
        raise InvalidRequestError(f"{name} must be <= {high}, got {value}", param=name)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite, got {value!r}", param=name)
    return float(value)


def _normalise_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items: Iterable[Any] = (value,) if isinstance(value, str) else value
    try:
        stop = tuple(items)
    except TypeError:
        raise InvalidRequestError(
            f"stop must be a str or a list of str, got {value!r}", param="stop"
        ) from None
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(
                f"stop strings must be non-empty str, got {s!r}", param="stop"
            )
    return stop


def _normalise_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    try:
        ids = tuple(value)
    except TypeError:
        raise InvalidRequestError(
            f"stop_token_ids must be a list of int, got {value!r}", param="stop_token_ids"
        ) from None
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidRequestError(
                f"stop_token_ids must be ints >= 0, got {t!r}", param="stop_token_ids"
            )
    return ids


def _normalise_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``{token_id: bias}`` (ids may be JSON's string keys) -> sorted ``((id, bias), ...)``."""
    if not value:
        return ()
    items = value.items() if isinstance(value, dict) else value
    out: dict[int, float] = {}
    try:
        for key, bias in items:
            tok = int(key)
            b = _check_float("logit_bias", bias)
            if tok < 0 or not -100 <= b <= 100:
                raise ValueError
            out[tok] = b
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"logit_bias must map token ids >= 0 to numbers in [-100, 100], got {value!r}",
            param="logit_bias",
        ) from None
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature (>= 0); 0 (anything below 1e-5) means greedy.
        top_k: keep the k most likely tokens (0 = off), at most ``MAX_TOP_K``; a top_k at
            least the vocabulary size keeps every token, i.e. is off (vLLM's semantics).
        top_p: nucleus sampling mass, in (0, 1] (1 = off).
        min_p: drop tokens below ``min_p * p_max``, in [0, 1] (0 = off).
        repetition_penalty: > 0; values above 1 discourage tokens already seen (1 = off).
        presence_penalty: in [-2, 2]; subtracted once from every token already generated.
        frequency_penalty: in [-2, 2]; subtracted per occurrence of a generated token.
        seed: per-request RNG seed (None = engine RNG), in ``[-2**63, 2**64)`` (what torch
            takes); completion ``i`` of ``n`` uses ``seed + i``, which must stay in range.
        stop: strings that end the output (checked by the detokenizer); a str or a list of str.
        stop_token_ids: token ids that end the output (kept in the output).
        ignore_eos: keep generating past the tokenizer's EOS tokens.
        logprobs: return the top-N log-probabilities per token, N in [0, 20] (None = off).
        n: number of completions for the prompt (>= 1).
        min_tokens: EOS and ``stop_token_ids`` are ignored until this many tokens exist.
        output_kind: what each output carries (see ``RequestOutputKind``).
        priority: under the ``priority`` scheduling policy, lower is served first (vLLM's
            semantics; default 0); ignored under ``fcfs``.
        structured_outputs: a constraint the output must satisfy (JSON schema, regex...),
            enforced while decoding (see ``carpool.structured``).
        logit_bias: ``{token_id: bias}`` added to the logits before sampling, bias in
            [-100, 100]; stored as sorted ``((id, bias), ...)``. Ids are checked against the
            vocabulary when the request is added.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    min_tokens: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    priority: int = 0
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: Any = ()

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("top_k", self.top_k, low=0, high=MAX_TOP_K)
        _check_int("n", self.n, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        _check_int("priority", self.priority, low=PRIORITY_MIN, high=PRIORITY_MAX)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
                param="min_tokens",
            )

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise InvalidRequestError(
                f"temperature must be >= 0, got {temperature}", param="temperature"
            )
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        min_p = _check_float("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {min_p}", param="min_p")
        rep = _check_float("repetition_penalty", self.repetition_penalty)
        if rep <= 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {rep}", param="repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = _check_float(name, getattr(self, name))
            if not -2 <= v <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v}", param=name)

        if self.seed is not None:
            _check_int("seed", self.seed, low=SEED_MIN, high=SEED_MAX - (self.n - 1))
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                    param="logprobs",
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(
                f"ignore_eos must be a bool, got {self.ignore_eos!r}", param="ignore_eos"
            )

        # Normalise the containers so the frozen object is hashable and cannot change later.
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise InvalidRequestError(
                "structured_outputs must be a StructuredOutputsParams", param="structured_outputs"
            )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature below 1e-5, or top_k 1)."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

"""SamplingParams: defaults, normalisation and validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from carpool.errors import InvalidRequestError
from carpool.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0
    assert p.stop == () and p.stop_token_ids == ()
    assert p.logprobs is None and p.n == 1 and p.min_tokens == 0
    assert not p.greedy


def test_stop_normalised_to_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)  # type: ignore[arg-type]


def test_frozen_and_hashable() -> None:
    p = SamplingParams(stop=["x"])  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("x",)))


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-6}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.7}, False),
    ],
)
def test_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens must be an int, got True"),
        ({"max_tokens": 2.0}, "max_tokens must be an int"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"top_k": 2**63}, f"top_k must be <= {2**31 - 1}, got {2**63}"),
        ({"seed": 2**64}, f"seed must be <= {2**64 - 1}, got {2**64}"),
        ({"seed": -(2**63) - 1}, f"seed must be >= {-(2**63)}"),
        ({"seed": 2**64 - 2, "n": 3}, f"seed must be <= {2**64 - 3}"),
        ({"priority": 2**63}, f"priority must be <= {2**63 - 1}"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\], got 1.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"stop": [""]}, "stop strings must be non-empty str"),
        ({"stop": [3]}, "stop strings must be non-empty str, got 3"),
        ({"stop": 3}, "stop must be a str or a list of str, got 3"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be ints >= 0, got -1"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of int"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"logprobs": 21}, r"logprobs must be in \[0, 20\], got 21"),
        ({"logprobs": -1}, r"logprobs must be in \[0, 20\], got -1"),
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be <= max_tokens \(4\), got 5"),
    ],
)
def test_invalid(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_invalid_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)


def test_boundaries_accepted() -> None:
    SamplingParams(
        max_tokens=1,
        temperature=0,
        top_p=1,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=0,
        seed=0,
        min_tokens=1,
    )
    SamplingParams(logprobs=20)

"""The sampler: truncation supports, seeds, penalties and logprobs."""

from __future__ import annotations

import pytest
import torch

from carpool.sampling_params import SamplingParams
from carpool.worker.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_truncation,
    argmax_only,
)

V = 50


def row(seed: int | None = None, prompt=(), output=(), **kw) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), gen)


def logits(seed: int = 0, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def draws(lg: torch.Tensor, n: int = 400, **kw) -> set[int]:
    sampler = Sampler()
    out = set()
    r = row(seed=1, **kw)
    for _ in range(n):
        out.add(sampler(lg, [r]).token_ids[0])
    return out


def test_greedy_is_argmax():
    lg = logits(rows=3)
    out = Sampler()(lg, [row(temperature=0)] * 3)
    assert out.token_ids == lg.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"temperature": 0}, True),
        ({"temperature": 1e-6, "top_k": 3, "top_p": 0.5, "min_p": 0.1, "seed": 4}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 0, "logprobs": 0}, False),
        ({"temperature": 0, "repetition_penalty": 1.1}, False),
        ({"temperature": 0, "presence_penalty": 0.5}, False),
        ({"temperature": 0, "frequency_penalty": -0.5}, False),
        ({"temperature": 0, "logit_bias": {"3": 5}}, False),
        ({"temperature": 0, "structured_outputs": {"regex": "a+"}}, False),
    ],
)
def test_argmax_only_names_the_rows_whose_token_is_the_raw_argmax(kw, expected):
    """Each option the sampler or the logits processor applies around a greedy argmax takes
    a row off the runner's direct argmax; truncations and seeds do not change a greedy row."""
    if "structured_outputs" in kw:
        from carpool.structured.params import StructuredOutputsParams

        kw = kw | {"structured_outputs": StructuredOutputsParams(**kw["structured_outputs"])}
    assert argmax_only(SamplingParams(**kw)) is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_gives_the_samplers_tokens(dtype):
    """Sampler.greedy (the runner's path for argmax-only rows) and the sampler agree, ties
    (the first maximal index) and NaN rows included."""
    lg = logits(rows=6).to(dtype)
    lg[1, 7] = lg[1, 30] = lg[1].max() + 1  # a tie: the first index wins
    lg[2, 11] = float("nan")
    lg[3] = 0.0
    rows = [row(temperature=0, top_k=2, seed=9)] * 6
    assert Sampler.greedy(lg) == Sampler()(lg, rows).token_ids
    assert Sampler.greedy(lg)[1] == 7 and Sampler.greedy(lg)[3] == 0


def test_top_k_support():
    lg = logits()
    support = set(lg[0].topk(5).indices.tolist())
    got = draws(lg, temperature=1.5, top_k=5)
    assert got <= support and len(got) > 1


def test_top_p_support():
    lg = logits() / 3
    probs = lg[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    k = int((cum < 0.6).sum()) + 1  # smallest prefix with mass >= 0.6
    support = set(order[:k].tolist())
    got = draws(lg, top_p=0.6)
    assert got <= support, f"{got - support} outside the top-p support"
    assert len(got) > 1


def test_min_p_support():
    lg = logits()
    probs = lg[0].softmax(-1)
    support = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    got = draws(lg, min_p=0.2)
    assert got <= support


def test_combined_truncations_intersect():
    lg = logits(3)
    top3 = set(lg[0].topk(3).indices.tolist())
    assert draws(lg, top_k=3, top_p=0.99, min_p=0.01) <= top3


def test_fixed_seed_reproduces_and_ignores_batch_mates():
    lg = logits(rows=4)
    s = Sampler()
    a = [s(lg[2:3], [row(seed=42, temperature=1.0)]).token_ids[0]]
    first = []
    r1 = row(seed=42, temperature=1.0)
    for _ in range(20):
        first.append(s(lg[2:3], [r1]).token_ids[0])
    second = []
    r2 = row(seed=42, temperature=1.0)
    for _ in range(20):
        out = s(lg, [row(temperature=1.0), row(temperature=0.5), r2, row(seed=7)])
        second.append(out.token_ids[2])
    assert first == second
    assert a[0] == first[0]
    assert len(set(first)) > 1


def test_repetition_penalty_as_specified():
    lg = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(lg.clone(), [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    # seen tokens: positive logits divided, negative ones multiplied; unseen unchanged
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_as_specified():
    lg = torch.zeros(1, 4)
    r = row(prompt=[3, 3], output=[0, 0, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(lg, [r])
    # token 0: 2 * 0.25 + 0.5; token 2: 0.25 + 0.5; prompt-only token 3 untouched
    assert out.tolist() == [[-1.0, 0.0, -0.75, 0.0]]


def test_penalties_change_only_their_rows():
    lg = logits(rows=2)
    out = apply_penalties(lg.clone(), [row(output=[1, 2], presence_penalty=1.0), row()])
    assert torch.equal(out[1], lg[1])
    assert out[0, 1] == pytest.approx(float(lg[0, 1]) - 1.0)


def test_truncation_keeps_at_least_one_token():
    lg = logits()
    out = apply_truncation(lg.clone(), [row(top_p=1e-9)])
    assert torch.isfinite(out).sum() == 1
    assert int(out.argmax()) == int(lg.argmax())


def test_logprobs_are_of_the_raw_distribution():
    lg = logits(rows=2)
    out = Sampler()(lg, [row(temperature=0, logprobs=3), row(temperature=0)])
    lp = out.logprobs[0]
    assert out.logprobs[1] is None
    ref = lg[0].log_softmax(-1)
    assert lp.token_id == int(lg[0].argmax())
    assert lp.logprob == pytest.approx(float(ref.max()), abs=1e-5)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


def test_top_k_past_the_vocabulary_is_off_and_cannot_overflow():
    """top_k >= V keeps every token (vLLM's semantics): the same draws as top_k 0."""
    lg = logits()
    assert draws(lg, top_k=V + 1) == draws(lg, top_k=0)
    huge = row(seed=1, temperature=1.0)
    object.__setattr__(huge.params, "top_k", 2**63)  # past any validation
    plain = row(seed=1, temperature=1.0)
    assert Sampler()(lg, [huge]).token_ids == Sampler()(lg, [plain]).token_ids


def test_tiny_temperature_is_greedy_beside_sampled_rows():
    lg = logits(rows=2)
    out = Sampler()(lg, [row(temperature=1e-7), row(seed=3, temperature=1.0)])
    assert out.token_ids[0] == int(lg[0].argmax())


def test_logprobs_on_a_vocabulary_smaller_than_asked():
    small = torch.randn(1, 5)
    out = Sampler()(small, [row(temperature=0, logprobs=20)])
    assert out.logprobs[0] is not None and len(out.logprobs[0].top) == 5

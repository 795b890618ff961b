"""The runner's direct argmax for steps whose rows are all greedy with nothing to apply.

``ModelRunner.execute`` skips the sampler (and its per-row objects) when every row is
``argmax_only``; the tokens must be the sampler's, and any other row in the step must send
the whole step through the sampler.
"""

from __future__ import annotations

import pytest

from carpool import LLM, SamplingParams
from carpool.worker import model_runner
from carpool.worker.sampler import Sampler
from helpers.tiny import make_prompts

PROMPTS = make_prompts(seed=3, lengths=[5, 17, 40, 90])


@pytest.fixture
def sampler_calls(monkeypatch) -> list[int]:
    """The row count of every call to the sampler."""
    original = Sampler.__call__
    calls: list[int] = []

    def call(self, logits, rows):
        calls.append(len(rows))
        return original(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", call)
    return calls


def generate(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_greedy_steps_skip_the_sampler_and_keep_its_tokens(
    tiny_llama, sampler_calls, monkeypatch
) -> None:
    llm = LLM(tiny_llama.path, dtype="float32", max_num_seqs=4)
    greedy = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * len(PROMPTS)
    direct = generate(llm, greedy)
    assert sampler_calls == [], "an all-greedy step went through the sampler"
    # The same requests through the sampler (the direct path off): the same tokens.
    monkeypatch.setattr(model_runner, "argmax_only", lambda params: False)
    assert generate(llm, greedy) == direct
    assert sampler_calls and max(sampler_calls) > 1


def test_one_row_that_needs_the_sampler_takes_the_whole_step_there(
    tiny_llama, sampler_calls
) -> None:
    llm = LLM(tiny_llama.path, dtype="float32", max_num_seqs=4)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = generate(llm, [greedy] * len(PROMPTS))
    assert sampler_calls == []
    with_logprobs = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    mixed = generate(llm, [greedy] * (len(PROMPTS) - 1) + [with_logprobs])
    assert mixed == alone
    # Steps holding the logprobs row sampled every row of the batch.
    assert max(sampler_calls) == len(PROMPTS)

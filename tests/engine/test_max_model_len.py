"""``max_model_len`` above the model's context: an error naming both numbers, unless
``allow_long_max_model_len`` (then the rotary tables grow and such a prompt runs)."""

from __future__ import annotations

import pytest

from carpool import LLM, SamplingParams
from carpool.errors import ModelLoadError


def test_above_the_context_is_an_error_naming_both_numbers():
    with pytest.raises(ModelLoadError, match=r"--max-model-len 4096 .* context of 1024 tokens"):
        LLM("embedded", max_model_len=4096)
    assert LLM("embedded", max_model_len=512).engine.max_model_len == 512  # below: as asked


def test_the_override_serves_past_the_context():
    llm = LLM("embedded", max_model_len=1536, allow_long_max_model_len=True, dtype="float32")
    assert llm.engine.limits.max_model_len == 1536
    prompt = list(range(5, 1205))  # 1200 token ids: past the 1024 positions it was trained on
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_the_rotary_table_is_sized_to_max_model_len():
    # Built for the model's 1,024 positions at load, rebuilt for the 200 the engine serves:
    # the same tokens as an engine at the full context, up to the last position.
    short = LLM("embedded", max_model_len=200, dtype="float32")
    full = LLM("embedded", dtype="float32")
    assert short.engine.model.model.rotary.cos_sin_cached.shape[0] == 200
    assert full.engine.model.model.rotary.cos_sin_cached.shape[0] == 1024
    prompts = [list(range(5, 5 + n)) for n in (3, 150, 190)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in short.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in full.generate(prompts, params, use_tqdm=False)]
    assert got == want

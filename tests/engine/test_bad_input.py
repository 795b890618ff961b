"""Invalid requests get clear errors; the engine keeps serving everyone else."""

from __future__ import annotations

import pytest

from carpool import InvalidRequestError, LLMEngine, SamplingParams
from carpool.config import EngineConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama.path, dtype="float32", max_model_len=512))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: SamplingParams(max_tokens=0), ["max_tokens", ">= 1"]),
        (lambda: SamplingParams(top_p=0.0), ["top_p", "(0, 1]"]),
        (lambda: SamplingParams(top_p=1.5), ["top_p", "1.5"]),
        (lambda: SamplingParams(temperature=-1), ["temperature"]),
        (lambda: SamplingParams(logprobs=99), ["logprobs"]),
    ],
)
def test_bad_sampling_params(make, words):
    with pytest.raises(InvalidRequestError) as e:
        make()
    for w in words:
        assert w in str(e.value)


def test_bad_requests_do_not_disturb_others(engine: LLMEngine, tiny_llama):
    good = tiny_llama.prompts[4]
    engine.add_request(good, GREEDY, request_id="good-1")
    engine.step()  # good-1 is running when the bad ones arrive
    cases = [
        ("", ["empty"]),
        ([], ["empty"]),
        ([1] * 600, ["600", "512"]),  # longer than the context
        ([5] * 505, ["max_tokens", "517", "512"]),  # prompt + max_tokens over the context
        ([1, 2, 99999], ["99999", "[0, 320)"]),  # token id outside the vocabulary
    ]
    for prompt, words in cases:
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt, GREEDY)
        for w in words:
            assert w in str(e.value), f"{w!r} not in {e.value}"
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(good, GREEDY, request_id="good-1")
    engine.add_request(tiny_llama.prompts[7], GREEDY, request_id="good-2")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert finished == {
        "good-1": tiny_llama.reference(good, 12),
        "good-2": tiny_llama.reference(tiny_llama.prompts[7], 12),
    }
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_abort_frees_blocks(engine: LLMEngine, tiny_llama):
    engine.add_request(tiny_llama.prompts[-1], GREEDY, request_id="victim")
    engine.add_request(tiny_llama.prompts[2], GREEDY, request_id="survivor")
    engine.step()
    engine.step()
    out = engine.abort("victim")
    assert out is not None and out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.abort("victim") is None
    results = {}
    while engine.has_unfinished():
        for o in engine.step():
            results[o.request_id] = o
    assert results["survivor"].outputs[0].token_ids == tiny_llama.reference(
        tiny_llama.prompts[2], 12
    )
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_stop_strings_and_stop_tokens(engine: LLMEngine, tiny_llama):
    prompt = tiny_llama.prompts[6]
    ref = tiny_llama.reference(prompt, 12)
    stop_tok = ref[5]
    engine.add_request(
        prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok]), "st"
    )
    full_text = engine.tokenizer.decode(ref)
    cut = full_text[len(full_text) // 2 :][:3]
    engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, stop=[cut]), "ss")
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o.outputs[0]
    st = outs["st"]
    assert st.finish_reason == "stop" and st.stop_reason == stop_tok
    assert st.token_ids == ref[: ref.index(stop_tok) + 1]
    ss = outs["ss"]
    assert ss.finish_reason == "stop" and ss.stop_reason == cut
    assert ss.text == full_text[: full_text.index(cut)]


def test_finished_requests_leave_no_state_in_the_runner(engine: LLMEngine, tiny_llama, monkeypatch):
    """A stop string, a failed batch and a normal finish all drop the runner's per-request
    state (seeded generator, block table): a long-running server must not keep it."""
    prompt = tiny_llama.prompts[6]
    full_text = engine.tokenizer.decode(tiny_llama.reference(prompt, 12))
    cut = full_text[len(full_text) // 2 :][:3]
    engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, stop=[cut]), "ss")
    engine.add_request(prompt, SamplingParams(max_tokens=4, seed=3), "seeded")
    while engine.has_unfinished():
        engine.step()
    runner = engine.runner
    assert not runner._generators and not runner.block_tables._tables

    def boom(*args, **kwargs):
        raise RuntimeError("injected model failure")

    engine.add_request(prompt, SamplingParams(max_tokens=4, seed=5), "doomed")
    engine.step()  # the prompt runs: a generator and a block table now exist
    assert runner._generators and runner.block_tables._tables
    monkeypatch.setattr(runner, "execute", boom)
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["error"]
    assert not runner._generators and not runner.block_tables._tables
    assert engine.block_manager.num_free_blocks == engine.num_blocks

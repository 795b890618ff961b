"""``EngineCore.step`` says what happened; outputs carry what their ``RequestOutputKind`` asks."""

from __future__ import annotations

import pytest

from carpool import LLMEngine, SamplingParams
from carpool.config import EngineConfig
from carpool.engine.core import EngineCore, NewRequest
from carpool.errors import ContextLengthError, EngineStoppedError, RequestTimeoutError
from carpool.sampling_params import RequestOutputKind
from carpool.server.errors import error_to_api

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama.path, dtype="float32", max_model_len=256))


def _params(kind: RequestOutputKind, n: int = 1, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, n=n, output_kind=kind, logprobs=2
    )


def _drain(engine: LLMEngine, rid: str) -> list:
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_delta_outputs_add_up_to_the_cumulative_ones(engine):
    engine.add_request(PROMPT, _params(RequestOutputKind.CUMULATIVE, n=2), request_id="c")
    final = _drain(engine, "c")[-1]
    engine.add_request(PROMPT, _params(RequestOutputKind.DELTA, n=2), request_id="d")
    deltas = _drain(engine, "d")
    assert deltas[-1].finished and len(deltas) >= 12
    for i, full in enumerate(final.outputs):
        parts = [o.outputs[i] for o in deltas]
        assert "".join(p.text for p in parts) == full.text
        assert [t for p in parts for t in p.token_ids] == full.token_ids
        assert [lp for p in parts for lp in p.logprobs] == full.logprobs
        assert all(len(p.token_ids) <= 1 for p in parts), "a delta holds only the step's token"
        assert parts[-1].num_tokens == len(full.token_ids) == 12
    assert final.timings and not any(o.timings for o in deltas[:-1])


def test_final_only_emits_once(engine):
    engine.add_request(PROMPT, _params(RequestOutputKind.FINAL_ONLY), request_id="f")
    outs = _drain(engine, "f")
    assert len(outs) == 1 and outs[0].finished
    assert len(outs[0].outputs[0].token_ids) == 12
    assert sum(len(c.delta_token_ids) for c in outs[0].outputs) == 12


def test_core_step_reports_what_happened(engine):
    core = EngineCore(engine)
    now = engine.clock()
    core.add_request(NewRequest("ok", PROMPT, _params(RequestOutputKind.DELTA), now))
    core.add_request(
        NewRequest("bad", PROMPT, _params(RequestOutputKind.DELTA, max_tokens=300), now)
    )
    first = core.step()
    assert first is not None and first.record is not None, "the model ran"
    assert first.num_added == 2 and [o.request_id for o in first.outputs] == ["ok"]
    ((rid, error),) = first.failed
    assert rid == "bad" and isinstance(error, ContextLengthError)
    assert (error.param, error.code, error.status) == ("max_tokens", "context_length_exceeded", 400)
    api = error_to_api(error)  # mapped by type and fields, never by the message
    assert (api.status, api.param, api.code) == (400, "max_tokens", "context_length_exceeded")
    steps = [first]
    while not any(out.finished for s in steps for out in s.outputs):
        step = core.step()
        assert step is not None and step.record is not None
        steps.append(step)
    assert steps[-1].finished == [(steps[-1].outputs[0], "length")]
    # Idle: nothing queued, nothing to run. A deadline in the past expires at the next step.
    core.add_request(
        NewRequest("late", PROMPT, _params(RequestOutputKind.DELTA, max_tokens=50), now, now, 0.5)
    )
    step = core.step()
    assert step is not None and step.record is None, "an expired request runs no forward pass"
    assert [(o.request_id, r) for o, r in step.finished] == [("late", "timeout")]
    assert isinstance(step.failed[0][1], RequestTimeoutError)
    # Shutdown aborts what runs and fails it with EngineStoppedError.
    core.add_request(
        NewRequest("left", PROMPT, _params(RequestOutputKind.DELTA, max_tokens=50), now)
    )
    assert core.step() is not None
    core.shutdown()
    last = core.step()
    assert last is not None and last.stopped
    assert [(rid, type(e)) for rid, e in last.failed] == [("left", EngineStoppedError)]
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_blocks

"""Request: the state machine, token-level stop conditions and timings."""

from __future__ import annotations

import pytest

from carpool.request import FinishReason, Request, RequestStatus
from carpool.sampling_params import SamplingParams


def make_request(
    prompt_len: int = 4, max_tokens: int = 8, eos: tuple[int, ...] = (), **params: object
) -> Request:
    return Request(
        "r0",
        list(range(100, 100 + prompt_len)),
        SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        arrival_time=10.0,
        eos_token_ids=eos,
    )


def test_sizes_and_all_token_ids() -> None:
    r = make_request(prompt_len=3)
    r.start_running(11.0)
    assert r.num_prompt_tokens == 3 and r.num_tokens == 3 and r.num_output_tokens == 0
    r.num_computed_tokens = 3
    r.append_output_token(7, 12.0)
    assert r.all_token_ids == [100, 101, 102, 7]
    assert r.output_token_ids == [7]
    assert r.num_tokens == 4 and r.num_uncomputed_tokens == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (RequestStatus.FINISHED_STOPPED, FinishReason.STOP),
        (RequestStatus.FINISHED_LENGTH, FinishReason.LENGTH),
        (RequestStatus.FINISHED_ABORTED, FinishReason.ABORT),
        (RequestStatus.FINISHED_ERROR, FinishReason.ERROR),
    ],
)
def test_status_reason_mapping(status: RequestStatus, reason: FinishReason) -> None:
    assert status.is_finished
    assert status.finish_reason is reason
    assert RequestStatus.from_finish_reason(reason) is status
    assert reason == reason.value  # str enum: serialises as "stop", "length", ...


def test_unfinished_statuses() -> None:
    for s in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED):
        assert not s.is_finished and s.finish_reason is None


def test_legal_transitions() -> None:
    r = make_request()
    assert r.status is RequestStatus.WAITING
    r.start_running(11.0)
    assert r.status is RequestStatus.RUNNING and r.first_scheduled_time == 11.0
    r.num_computed_tokens = 4
    assert r.preempt() == 4
    assert r.status is RequestStatus.PREEMPTED
    assert r.num_computed_tokens == 0 and r.num_preemptions == 1
    r.start_running(12.0)
    assert r.first_scheduled_time == 11.0  # the first admission is kept
    r.finish(RequestStatus.FINISHED_ERROR, 13.0, error="boom")
    assert r.is_finished and r.finish_reason is FinishReason.ERROR
    assert r.error == "boom" and r.finished_time == 13.0


def test_illegal_transitions_assert() -> None:
    r = make_request()
    with pytest.raises(AssertionError, match="cannot preempt request 'r0' in status WAITING"):
        r.preempt()
    with pytest.raises(AssertionError, match="in status WAITING"):
        r.append_output_token(1, 0.0)
    r.start_running(0.0)
    with pytest.raises(AssertionError, match="cannot start request 'r0' in status RUNNING"):
        r.start_running(0.0)
    with pytest.raises(AssertionError, match="needs a FINISHED_"):
        r.finish(RequestStatus.WAITING, 0.0)
    r.finish(RequestStatus.FINISHED_ABORTED, 1.0)
    with pytest.raises(AssertionError, match="already finished"):
        r.finish(RequestStatus.FINISHED_ABORTED, 1.0)


def feed(r: Request, tokens: list[int]) -> list[FinishReason | None]:
    if r.status is RequestStatus.WAITING:
        r.start_running(0.0)
    return [r.append_output_token(t, float(i)) for i, t in enumerate(tokens)]


def test_length() -> None:
    assert feed(make_request(max_tokens=3), [1, 2, 3]) == [None, None, FinishReason.LENGTH]


def test_eos_stops_and_ignore_eos_does_not() -> None:
    assert feed(make_request(eos=(2,)), [1, 2]) == [None, FinishReason.STOP]
    assert feed(make_request(eos=(2,), ignore_eos=True), [1, 2]) == [None, None]


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    r = make_request(ignore_eos=True, stop_token_ids=(5,))
    assert feed(r, [1, 5]) == [None, FinishReason.STOP]


def test_min_tokens_delays_eos_and_stop_ids() -> None:
    r = make_request(eos=(2,), stop_token_ids=(5,), min_tokens=3)
    assert feed(r, [2, 5, 2]) == [None, None, FinishReason.STOP]


def test_stop_wins_over_length_on_the_last_token() -> None:
    assert feed(make_request(max_tokens=2, eos=(9,)), [1, 9]) == [None, FinishReason.STOP]


def test_timings() -> None:
    r = make_request(max_tokens=3)
    assert r.timings().ttft is None and r.timings().mean_inter_token is None
    r.start_running(10.5)
    r.append_output_token(1, 12.0)
    r.append_output_token(2, 12.5)
    r.append_output_token(3, 13.5)
    r.finish(RequestStatus.FINISHED_LENGTH, 14.0)
    t = r.timings()
    assert t.queue_wait == pytest.approx(0.5)
    assert t.ttft == pytest.approx(2.0)
    assert t.inter_token_gaps == pytest.approx([0.5, 1.0])
    assert t.mean_inter_token == pytest.approx(0.75)
    assert t.e2e == pytest.approx(4.0)
    assert r.token_times == [12.0, 12.5, 13.5]


def test_default_params_and_arrival() -> None:
    r = Request("x", [1, 2])
    assert r.sampling_params == SamplingParams()
    assert r.arrival_time > 0
    assert "Request('x', status=WAITING" in repr(r)

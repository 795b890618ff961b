"""Constraint parameters, request-field mapping and the logits step, without a model."""

from __future__ import annotations

import json

import pytest
import torch

from carpool.errors import InvalidRequestError
from carpool.sampling_params import SamplingParams
from carpool.server.protocol import ChatCompletionRequest, CompletionRequest
from carpool.structured import StructuredOutputsParams
from carpool.structured.compiler import compiler_for
from carpool.structured.processor import LogitsProcessor
from carpool.tokenizer import Tokenizer
from structured.embedded import EMBEDDED


def test_exactly_one_constraint():
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams(regex="a", choice=("b",))
    with pytest.raises(InvalidRequestError):
        StructuredOutputsParams(choice=())
    assert StructuredOutputsParams(choice=["x", "y"]).choice == ("x", "y")
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutputsParams.from_schema('{"type": ', "guided_json")
    assert e.value.param == "guided_json"


def _req(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


@pytest.mark.parametrize(
    ("fields", "kind", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "json",
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "structured_outputs"),
        ({"structured_outputs": {"json": {"type": "integer"}}}, "json", "structured_outputs"),
        ({"guided_json": '{"type": "string"}'}, "json", "guided_json"),
        ({"guided_regex": "a"}, "regex", "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", "guided_grammar"),
    ],
)
def test_request_fields_map_to_one_constraint(fields, kind, param):
    c = _req(**fields).constraint_of()
    assert c is not None and (c.kind, c.param) == (kind, param)


def test_no_constraint_and_text_format():
    assert _req().constraint_of() is None
    assert _req(response_format={"type": "text"}).constraint_of() is None
    with pytest.raises(InvalidRequestError) as e:
        _req(guided_regex="a", guided_choice=["b"]).constraint_of()
    assert e.value.param == "guided_choice"


def test_schema_keeps_property_order():
    schema = {"type": "object", "properties": {"z": {}, "a": {}}}
    c = StructuredOutputsParams.from_schema(schema, "x")
    assert list(json.loads(c.json)["properties"]) == ["z", "a"]


def test_unsupported_fields_are_named():
    with pytest.raises(InvalidRequestError) as e:
        _req(suffix="x").check_supported()
    assert (e.value.param, e.value.code) == ("suffix", "unsupported_parameter")
    _req(suffix=None, best_of=1, user="u", metadata={"a": "b"}, store=True).check_supported()
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "prediction": {}}
    )
    with pytest.raises(InvalidRequestError) as e:
        chat.check_supported()
    assert e.value.param == "prediction"
    assert "prediction" not in chat.unknown_fields()


def test_logit_bias_normalised_and_checked():
    p = SamplingParams(logit_bias={"5": 1.5, 2: -100})
    assert p.logit_bias == ((2, -100.0), (5, 1.5))
    for bad in ({"x": 1}, {-1: 1}, {3: 101}, {3: float("nan")}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(logit_bias=bad)


@pytest.fixture(scope="module")
def processor() -> LogitsProcessor:
    tok = Tokenizer.from_pretrained_dir(EMBEDDED)
    return LogitsProcessor(lambda: compiler_for(tok, 4096), tok.eos_token_ids)


def test_unconstrained_batch_is_untouched(processor):
    logits = torch.randn(3, 4096)
    same = processor.apply(logits, ["a", "b", "c"], [SamplingParams()] * 3)
    assert same is logits


def test_mask_only_on_constrained_rows(processor):
    logits = torch.zeros(3, 4096)
    so = StructuredOutputsParams(choice=("yes", "no"))
    params = [
        SamplingParams(),
        SamplingParams(structured_outputs=so),
        SamplingParams(logit_bias={7: 3}),
    ]
    out = processor.apply(logits, ["u", "c", "b"], params)
    assert torch.equal(out[0], logits[0])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 20  # only tokens that start "yes" or "no"
    assert out[2, 7] == 3 and out[2].sum() == 3
    assert torch.equal(logits, torch.zeros(3, 4096))  # the caller's tensor is not edited
    processor.release("c")


def test_bias_ids_checked_against_vocab(processor):
    with pytest.raises(InvalidRequestError) as e:
        processor.check(SamplingParams(logit_bias={4096: 1}), 4096)
    assert e.value.param == "logit_bias"

"""Structured outputs through the offline API, with the embedded 4M-parameter code model.

The model only ever writes Python, so every JSON document below exists because the grammar
mask forced it, token by token.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from carpool import LLM, SamplingParams
from carpool.errors import InvalidRequestError
from carpool.structured import StructuredOutputsParams
from structured.embedded import EMBEDDED
from structured.schemas import SCHEMAS


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(EMBEDDED))


def _greedy(max_tokens: int = 120, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_unconstrained_model_does_not_write_json(llm):
    text = llm.generate(["{"], _greedy(40))[0].outputs[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads("{" + text)


def test_every_schema_gives_valid_json_in_one_batch(llm):
    names = list(SCHEMAS)
    params = [
        _greedy(structured_outputs=StructuredOutputsParams.from_schema(SCHEMAS[n], "test"))
        for n in names
    ]
    outs = llm.generate(["def main():"] * len(names), params)
    for name, out in zip(names, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", f"{name}: cut short: {c.text!r}"
        doc = json.loads(c.text)
        jsonschema.validate(doc, SCHEMAS[name])


def test_sampled_outputs_validate_too(llm):
    schema = SCHEMAS["mixed_record"]
    so = StructuredOutputsParams.from_schema(schema, "test")
    params = [
        SamplingParams(max_tokens=160, temperature=1.0, seed=s, structured_outputs=so)
        for s in range(4)
    ]
    outs = llm.generate(["import os"] * 4, params)
    texts = {o.outputs[0].text for o in outs}
    for t in texts:
        jsonschema.validate(json.loads(t), schema)
    assert len(texts) > 1, "seeded samples should differ"


def test_regex_and_choice_hold(llm):
    regex = r"[a-z]{2,6}_[0-9]{1,3}"
    choice = ("apple", "banana split", "cherry")
    outs = llm.generate(
        ["x = ", "y = "],
        [
            _greedy(30, structured_outputs=StructuredOutputsParams(regex=regex)),
            _greedy(30, structured_outputs=StructuredOutputsParams(choice=choice)),
        ],
    )
    assert re.fullmatch(regex, outs[0].outputs[0].text), outs[0].outputs[0].text
    assert outs[1].outputs[0].text in choice


def test_ebnf_grammar_and_json_object(llm):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(
        ["def f():"],
        [_greedy(40, structured_outputs=StructuredOutputsParams(grammar=grammar))],
    )
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", outs[0].outputs[0].text)
    # Any JSON object: every prefix the model wrote is the start of an object.
    text = (
        llm.generate(
            ["{"], _greedy(20, structured_outputs=StructuredOutputsParams(json_object=True))
        )[0]
        .outputs[0]
        .text
    )
    assert text.startswith("{")


def test_constrained_row_leaves_batch_neighbours_unchanged(llm):
    prompts = ["def add(a, b):", "class Stack:", "import sys\n"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(24))]
    so = StructuredOutputsParams.from_schema(SCHEMAS["nested_object"], "test")
    mixed = llm.generate(
        [prompts[0], "def main():", prompts[1], "def g():", prompts[2]],
        [
            _greedy(24),
            _greedy(structured_outputs=so),
            _greedy(24),
            _greedy(structured_outputs=so),
            _greedy(24),
        ],
    )
    got = [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]
    assert got == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS["nested_object"])


def test_logit_bias_forces_and_bans(llm):
    out = llm.generate(["def f():"], _greedy(6, logit_bias={77: 100}))[0].outputs[0]
    assert out.token_ids == [77] * 6
    plain = llm.generate(["def f():"], _greedy(6))[0].outputs[0].token_ids
    banned = llm.generate(["def f():"], _greedy(6, logit_bias={plain[0]: -100}))[0].outputs[0]
    assert banned.token_ids[0] != plain[0]


def test_bad_constraints_are_refused_before_queueing(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["x"], _greedy(4, structured_outputs=StructuredOutputsParams(regex="(")))
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutputsParams.from_schema({"type": "nope"}, "response_format")
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["x"], _greedy(4, logit_bias={10**6: 1.0}))
    assert e.value.param == "logit_bias"
    assert llm.engine.num_requests == 0

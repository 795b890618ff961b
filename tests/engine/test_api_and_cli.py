"""The Python API's chat and streaming paths, and ``carpool generate``."""

from __future__ import annotations

import json

import pytest

from carpool import LLM, SamplingParams
from carpool.cli import main

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama.path, dtype="float32")


def test_generate_accepts_text_and_ids_in_input_order(llm, tiny_llama):
    prompts = ["def fibonacci(n):", tiny_llama.prompts[3], "import os"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["def fibonacci(n):", None, "import os"]
    assert outs[1].prompt_token_ids == tiny_llama.prompts[3]
    assert outs[1].outputs[0].token_ids == tiny_llama.reference(tiny_llama.prompts[3], 10)
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids)
        t = o.timings[0]
        assert 0 <= t.queue_wait <= t.ttft <= t.e2e and len(t.inter_token_gaps) == 9


def test_chat_uses_the_template(llm):
    conv = [{"role": "user", "content": "hi there"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    expected = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert out.prompt_token_ids == expected
    assert len(out.outputs[0].token_ids) == 10


def test_stream_deltas_add_up(llm):
    prompts = ["class Stack:", "for i in range("]
    texts = {}
    tokens = {}
    for delta in llm.stream(prompts, GREEDY):
        c = delta.outputs[0]
        texts[delta.request_id] = texts.get(delta.request_id, "") + c.delta_text
        tokens[delta.request_id] = tokens.get(delta.request_id, []) + c.delta_token_ids
        if delta.finished:
            assert texts[delta.request_id] == c.text
            assert tokens[delta.request_id] == c.token_ids
    full = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert sorted(texts.values()) == sorted(o.outputs[0].text for o in full)


def test_cli_generate(tiny_llama, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def f(x):"}) + "\n" + json.dumps({"prompt": "import sys"}) + "\n"
    )
    rc = main(
        [
            "generate",
            "--model",
            tiny_llama.path,
            "--dtype",
            "float32",
            "-p",
            "class A:",
            "--prompts-file",
            str(prompts),
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]
    )
    assert rc == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["prompt"] for x in lines] == ["class A:", "def f(x):", "import sys"]
    assert all(x["tokens"] == 8 for x in lines)
    assert "requests=3 generated_tokens=24" in err and "mean_batch_size=" in err


def test_cli_generate_reports_bad_input(tiny_llama, capsys):
    rc = main(["generate", "--model", tiny_llama.path, "-p", "x", "--top-p", "2"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err

"""The official ``openai`` client against the server: same text as ``LLM.generate``."""

from __future__ import annotations

import math

import openai
import pytest

from carpool import SamplingParams

MODEL = "tiny-llama"
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\n", "Héllo wörld ✓"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _greedy(reference, prompt, max_tokens=12, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return reference.generate([prompt], params, use_tqdm=False)[0]


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_matches_llm_generate(server, client, reference, text_diff):
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        exp = _greedy(reference, prompt)
        c = exp.outputs[0]
        assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == c.text, text_diff(r.choices[0].text, c.text)
        assert r.choices[0].finish_reason == c.finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(c.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_forms(server, client, reference):
    ids = reference.tokenizer.encode(PROMPTS[0])
    want = _greedy(reference, PROMPTS[0]).outputs[0].text
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    r = client.completions.create(
        model=MODEL,
        prompt=[ids, reference.tokenizer.encode(PROMPTS[1])],
        max_tokens=12,
        temperature=0,
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == want
    assert r.choices[1].text == _greedy(reference, PROMPTS[1]).outputs[0].text
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [
        _greedy(reference, p).outputs[0].text for p in PROMPTS[:3]
    ]


def test_completion_stream_matches(server, client, reference, text_diff):
    for prompt in PROMPTS[:2]:
        stream = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
        exp = _greedy(reference, prompt)
        assert text == exp.outputs[0].text, text_diff(text, exp.outputs[0].text)
        assert finish == exp.outputs[0].finish_reason
        assert usage is not None and usage.completion_tokens == len(exp.outputs[0].token_ids)
        assert usage.prompt_tokens == len(exp.prompt_token_ids)


def test_n2_greedy_and_seeded(server, client, reference):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, n=2)
    want = _greedy(reference, PROMPTS[0], max_tokens=8).outputs[0].text
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [want, want]
    # Seeded sampling: the server gives each of the n completions the same seed as LLM does.
    params = SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=42)
    exp = reference.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=42
    )
    assert [c.text for c in r.choices] == [o.text for o in exp.outputs]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in exp.outputs)
    # Streaming n=2: both choices arrive, each complete.
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=2, seed=42, stream=True
    ):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert [texts[0], texts[1]] == [o.text for o in exp.outputs]


def test_stop_strings(server, client, reference):
    full = _greedy(reference, PROMPTS[0], max_tokens=24).outputs[0].text
    # A stop string from the middle of the greedy text (no replacement characters).
    start = next(
        i
        for i in range(4, len(full) - 2)
        if "\ufffd" not in full[i : i + 2] and full[i : i + 2].strip()
    )
    stop = full[start : start + 2]
    exp = _greedy(reference, PROMPTS[0], max_tokens=24, stop=[stop]).outputs[0]
    assert exp.finish_reason == "stop" and len(exp.text) < len(full)
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == exp.text and r.choices[0].finish_reason == "stop"
    text = "".join(
        ch.text
        for chunk in client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=True
        )
        for ch in chunk.choices
    )
    assert text == exp.text


def test_completion_logprobs(server, client, reference):
    exp = _greedy(reference, PROMPTS[2], max_tokens=6, logprobs=3).outputs[0]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(exp.token_ids) == len(lp.token_logprobs)
    for got, want in zip(lp.token_logprobs, exp.logprobs, strict=True):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_matches_llm_chat(server, client, reference, text_diff):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write fibonacci."},
    ]
    exp = reference.chat(messages, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == exp.outputs[0].text, text_diff(msg.content, exp.outputs[0].text)
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert r.usage.completion_tokens == len(exp.outputs[0].token_ids)

    # max_completion_tokens, streaming with usage, n=2
    text, usage, finish = {0: "", 1: ""}, None, {}
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert text == {0: exp.outputs[0].text, 1: exp.outputs[0].text}
    assert finish == {0: exp.outputs[0].finish_reason, 1: exp.outputs[0].finish_reason}
    assert usage.completion_tokens == 2 * len(exp.outputs[0].token_ids)
    assert usage.prompt_tokens == len(exp.prompt_token_ids)


def test_chat_logprobs_and_content_parts(server, client, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    exp = reference.chat(
        [{"role": "user", "content": "Hello"}],
        SamplingParams(max_tokens=5, temperature=0, logprobs=2),
        use_tqdm=False,
    )[0].outputs[0]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    assert r.choices[0].message.content == exp.text
    content = r.choices[0].logprobs.content
    assert len(content) == len(exp.token_ids)
    for got, want in zip(content, exp.logprobs, strict=True):
        assert math.isclose(got.logprob, want.logprob, abs_tol=1e-4)
        assert len(got.top_logprobs) == 2
        assert got.bytes == list(got.token.encode())


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model"

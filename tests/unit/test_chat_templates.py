"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them.

Data: the real templates in ``tests/fixtures/chat-templates/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from carpool.errors import InvalidRequestError
from carpool.tokenizer import Tokenizer
from carpool.tokenizer.chat_template import ChatTemplate

transformers = pytest.importorskip("transformers")

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "chat-templates"
TEMPLATES = sorted(p.name for p in TEMPLATE_DIR.glob("*.jinja"))

# The special tokens each model's tokenizer config gives the template.
SPECIAL_TOKENS: dict[str, tuple[str | None, str]] = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": (None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": (None, "<|im_end|>"),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>"),
}

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b>?\nExplain."},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


def _backend(bos: str | None, eos: str) -> HFTokenizer:
    vocab = {"<unk>": 0, eos: 1, "hello": 2}
    if bos is not None:
        vocab[bos] = 3
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in (bos, eos) if t is not None])
    return tok


def _pair(name: str) -> tuple[Tokenizer, Any]:
    """Our tokenizer and transformers' one, with the same template and special tokens."""
    template = (TEMPLATE_DIR / name).read_text(encoding="utf-8")
    bos, eos = SPECIAL_TOKENS.get(name, ("<s>", "</s>"))
    ours = Tokenizer(_backend(bos, eos), bos_token=bos, eos_token=eos, chat_template=template)
    special = {"eos_token": eos} if bos is None else {"bos_token": bos, "eos_token": eos}
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend(bos, eos), unk_token="<unk>", **special
    )
    theirs.chat_template = template
    return ours, theirs


def _render_both(
    name: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **extra: Any
) -> tuple[str | Exception, str | Exception]:
    ours, theirs = _pair(name)
    results: list[str | Exception] = []
    for render in (
        lambda: ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **extra
        ),
        lambda: theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        ),
    ):
        try:
            results.append(render())
        except Exception as exc:  # compared below: both must fail or neither
            results.append(exc)
    return results[0], results[1]


def _assert_same(ours: str | Exception, theirs: str | Exception, label: str) -> None:
    if isinstance(theirs, Exception):
        assert isinstance(ours, InvalidRequestError), (
            f"{label}: transformers raised {theirs!r} but carpool gave {ours!r}"
        )
        assert str(theirs) in str(ours), f"{label}: message {ours} lacks {theirs}"
        return
    assert not isinstance(ours, Exception), f"{label}: carpool raised {ours!r}"
    assert isinstance(ours, str)
    if ours != theirs:
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        pytest.fail(
            f"{label}: renders differ at char {at}\n--- carpool\n{ours!r}\n--- transformers\n"
            f"{theirs!r}"
        )


def test_fixture_templates_exist() -> None:
    assert set(TEMPLATES) == set(SPECIAL_TOKENS), TEMPLATES


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", TEMPLATES)
def test_multi_turn_matches_transformers(name: str, add_generation_prompt: bool) -> None:
    ours, theirs = _render_both(name, CONVERSATION, add_generation_prompt)
    _assert_same(ours, theirs, f"{name} gen={add_generation_prompt}")
    if name.startswith("google-gemma"):
        # Gemma rejects a system role: both must raise, with the template's message.
        assert isinstance(theirs, Exception) and isinstance(ours, InvalidRequestError)
        assert "System role not supported" in str(ours)
        # Without the system message it renders, identically.
        ours, theirs = _render_both(name, CONVERSATION[1:], add_generation_prompt)
        _assert_same(ours, theirs, f"{name} (no system) gen={add_generation_prompt}")
        assert isinstance(ours, str) and ours.startswith("<bos><start_of_turn>user\n")
    else:
        assert isinstance(ours, str)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False}),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", {"tools": [WEATHER_TOOL]}),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", {"tools": [WEATHER_TOOL]}),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", {"date_string": "01 Jan 2025"}),
    ],
)
def test_extra_template_variables_match_transformers(name: str, extra: dict[str, Any]) -> None:
    ours, theirs = _render_both(name, CONVERSATION, True, **extra)
    _assert_same(ours, theirs, f"{name} {sorted(extra)}")


def test_rejected_conversation_is_invalid_request() -> None:
    ours, _ = _pair("google-gemma-2-2b-it.jinja")
    bad_order = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        ours.apply_chat_template(bad_order)


def test_no_chat_template_is_invalid_request() -> None:
    tok = Tokenizer(_backend("<s>", "</s>"), bos_token="<s>", eos_token="</s>")
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_tokenize_returns_ids_without_extra_bos() -> None:
    tok = Tokenizer(
        _backend("<s>", "</s>"),
        bos_token="<s>",
        eos_token="</s>",
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True) == [3, 2]


def test_sandbox_and_helpers() -> None:
    # tojson keeps non-ASCII and HTML characters; the sandbox blocks attribute escapes.
    rendered = ChatTemplate("{{ messages | tojson }}").render([{"content": "é <b>"}])
    assert rendered == '[{"content": "é <b>"}]'
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(InvalidRequestError, match="syntax error"):
        ChatTemplate("{% if %}")
    assert ChatTemplate("{{ strftime_now('%Y') | length }}").render([]) == "4"
    looped = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m }}{% endfor %}"
    )
    assert ChatTemplate(looped).render(["a", "b"]) == "a"
